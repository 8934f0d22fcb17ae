"""`python -m model.train adclick --config FILE --seed N [--resume] ...`: trains the learned interactive ADClick
network (the loop: model/training/train_adclick.py; the training set: model/training/prepare.py).

Under `torchrun --nproc_per_node=N` every rank runs this; rank 0 builds the caches first, the others load them.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import atomic_save, make_checkpoint
from model.modeling.adclick import ARCH
from model.training import distributed
from model.training.train_adclick import LoopConfig, build_net, train

logger = logging.getLogger(__name__)

DESCRIPTION = ("Training loop of the learned ADClick network over cached synthetic samples "
               "(see model/training/samples.py).")


def _parse(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m model.train adclick", description=DESCRIPTION)
    p.add_argument("--config", required=True, help="JSON training config (configs/adclick.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --ckpt when it exists")
    p.add_argument("--dataset", default=None, help="MVTec-style folder of the product (overrides config)")
    p.add_argument("--cache", default=None, help="training-set cache file (built when missing)")
    p.add_argument("--prompts", default=None, help="precomputed prompt table (.pt); else encode")
    p.add_argument("--ckpt", default=None, help="resumable training checkpoint (default: <out>.ckpt)")
    p.add_argument("--out", default=None, help="final weights file (overrides config)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="synthesis worker processes")
    p.add_argument("--scale", type=float, default=1.0, help="multiply sample counts and steps (smoke runs)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (e.g. weights/adclick.pt: fine-tuning keeps their input scales)")
    return p.parse_args(argv)


def folder_specs(data: dict, dataset_arg: str | None, scale: float) -> list:
    """The config's product folders: `data.products` ([{"dataset", "object", "samples"}]), or the older single
    `data.dataset` with `data.tire_samples` (overridden by --dataset)."""
    from model.training.prepare import FolderSpec

    if data.get("products"):
        return [FolderSpec(Path(p["dataset"]), p.get("object", "product surface"), int(p["samples"] * scale))
                for p in data["products"]]
    dataset = dataset_arg or data.get("dataset")
    if not dataset:
        return []
    return [FolderSpec(Path(dataset), data.get("objects", ["tire"])[0], int(data.get("tire_samples", 0) * scale))]


def _prompts(args, cfg: dict, cache: Path) -> dict[str, torch.Tensor]:
    from model.modeling.text import TextConfig, build_text_encoder
    from model.training.prepare import prompt_table

    path = Path(args.prompts) if args.prompts else cache.with_suffix(".prompts.pt")
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    table = prompt_table(build_text_encoder(TextConfig(**cfg.get("text", {}))), cfg["data"]["objects"])
    atomic_save(table, path)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    from model.device import resolve_device
    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualConfig, ResidualEngine
    from model.training.prepare import build_training_set
    from model.training.samples import load_samples, save_samples

    args = _parse(argv)
    cfg = json.loads(Path(args.config).read_text())
    ctx = distributed.init(resolve_device(args.device))  # torchrun: join its group (else a world of one)
    device = ctx.device
    torch.manual_seed(args.seed)
    data = cfg["data"]
    out = Path(args.out or cfg["out"])
    cache = Path(args.cache or data["cache"])
    with distributed.main_first(ctx):  # under torchrun rank 0 builds the caches, the other ranks load them
        prompts = _prompts(args, cfg, cache)
        if cache.is_file():
            samples = load_samples(cache)
            logger.info("loaded %d cached samples from %s", len(samples), cache)
        else:
            bb = dict(cfg.get("backbone", {}), device=str(device))
            engine = ResidualEngine(BackboneConfig(**bb), ResidualConfig(**cfg.get("residual", {})),
                                    cache_dir=cache.parent / "banks")
            opts = {k: data[k] for k in ("kinds", "at_border", "multi") if k in data}
            samples = build_training_set(engine, folder_specs(data, args.dataset, args.scale),
                                         int(data["texture_samples"] * args.scale), args.seed, device,
                                         args.workers, opts)
            save_samples(samples, cache)
    loop = LoopConfig(**dict(cfg.get("loop", {}), steps=max(1, int(cfg["loop"]["steps"] * args.scale))))
    if args.max_minutes is not None:
        loop = LoopConfig(**dict(asdict(loop), max_minutes=args.max_minutes))
    text_dim = int(next(iter(prompts.values())).shape[1])
    net = build_net(cfg.get("model", {}), samples, text_dim)
    if args.init:
        from model.checkpoint import load_checkpoint

        start = load_checkpoint(args.init, ARCH)
        net.load_state_dict(start["state_dict"])
        logger.info("starting from %s (its input scales kept)", args.init)
    meta = {"seed": args.seed, "samples": len(samples), "config_file": Path(args.config).name,
            "products": sorted({s.product for s in samples}),
            "backbone": {k: v for k, v in BackboneConfig(**cfg.get("backbone", {})).to_dict().items()
                         if k not in ("device", "batch_size")},
            "residual": cfg.get("residual", {}), "text": cfg.get("text", {})}
    ckpt = Path(args.ckpt) if args.ckpt else out.with_suffix(".ckpt")
    if args.init:
        meta["init"] = Path(args.init).name
    losses = train(net, samples, prompts, loop, args.seed, device, ckpt, args.resume, meta, dist=ctx,
                   init_scales=not args.init)
    meta["final_loss"] = distributed.all_reduce_mean(float(np.mean(losses[-50:])), ctx) if losses else None
    meta["steps"] = len(losses)
    net.cpu()
    if ctx.is_main:
        atomic_save(make_checkpoint(ARCH, net.cfg.to_dict(), net.state_dict(), meta), out)
        logger.info("wrote %s (%d steps, final loss %s)", out, len(losses), meta["final_loss"])
    distributed.cleanup(ctx)
    return 0

