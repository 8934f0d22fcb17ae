"""`python -m weights fetch NAME [--dest DIR] [--url URL]` and `python -m weights list`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from weights import OPEN_CLIP_CHECKPOINTS, WeightsError, fetch


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weights")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a named open_clip checkpoint (sha256-verified)")
    f.add_argument("name", choices=sorted(OPEN_CLIP_CHECKPOINTS))
    f.add_argument("--dest", default="data/checkpoints")
    f.add_argument("--url", default=None, help="alternative address (mirror)")
    sub.add_parser("list", help="the named checkpoints")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        for name, (url, sha, _) in sorted(OPEN_CLIP_CHECKPOINTS.items()):
            print(f"{name}\t{sha[:12]}\t{url}")
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
