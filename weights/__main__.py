"""`python -m weights fetch NAME [--dest DIR] [--url URL]` and `python -m weights list`."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from weights import OPEN_CLIP_CHECKPOINTS, WeightsError, fetch, write_entry

LICENCE = ("Apache-2.0 (weights trained here). Training data: MVTec 3D-AD tire train/good + validation/good"
           " "
           "(CC BY-NC-SA 4.0, non-commercial) with synthetic defects; scikit-image textures (CC0); backbone "
           "EfficientNet-Lite0 ImageNet weights (Apache-2.0); prompts by all-MiniLM-L6-v2 (Apache-2.0).")


def register(wdir: Path, name: str, file: str, training: str, metrics_path: str | None) -> dict:
    import json

    import torch

    ckpt = torch.load(wdir / file, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    entry = {
        "file": file, "arch": ckpt["arch"], "config": ckpt["config"],
        "engine": {"backbone": meta.get("backbone", {}), "residual": meta.get("residual", {})},
        "text": meta.get("text", {}), "seed": meta.get("seed"),
        "training": {"description": training, "samples": meta.get("samples"),
                     "products": meta.get("products"),
                     "steps": meta.get("steps"), "final_loss": meta.get("final_loss"),
                     "config_file": meta.get("config_file")},
        "metrics": json.loads(Path(metrics_path).read_text()) if metrics_path else {},
        "licence": LICENCE,
    }
    return write_entry(wdir, name, entry)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weights")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a named open_clip checkpoint (sha256-verified)")
    f.add_argument("name", choices=sorted(OPEN_CLIP_CHECKPOINTS))
    f.add_argument("--dest", default="data/checkpoints")
    f.add_argument("--url", default=None, help="alternative address (mirror)")
    sub.add_parser("list", help="the named checkpoints")
    r = sub.add_parser("register", help="describe a trained ADClick checkpoint in manifest.json")
    r.add_argument("name")
    r.add_argument("file", help="checkpoint inside the weights folder")
    r.add_argument("--dir", default=str(Path(__file__).resolve().parent))
    r.add_argument("--training", default="", help="free text: data, time, hardware")
    r.add_argument("--metrics", default=None, help="JSON file of measured metrics to embed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        for name, (url, sha, _) in sorted(OPEN_CLIP_CHECKPOINTS.items()):
            print(f"{name}\t{sha[:12]}\t{url}")
        return 0
    if args.cmd == "register":
        entry = register(Path(args.dir), args.name, args.file, args.training, args.metrics)
        print(f"{args.name}: {entry['file']} sha256 {entry['sha256'][:12]}")
        return 0
    try:
        path = fetch(args.name, Path(args.dest), args.url)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
