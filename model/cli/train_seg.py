"""ADClick-Seg trained on the first N defective test images of an MVTec-style folder (seeded shuffle), published
into --out as a new version.

  python -m model.train seg --dataset DIR --out DIR [--n-train 20] [--labels masks|boxes]

The pipeline is model/seg/train.py (`train_version`, as the service's fit uses it); the examples come from
model/evaluation/seg_runs.py (`load_examples`, shared with the learning-curve benchmark).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence

import torch

from model.cli.common import add_common_flags
from model.evaluation.seg_runs import as_boxes, load_examples
from model.seg.fit import FitConfig
from model.seg.train import SegTrainConfig, prompt_matrix, train_version
from model.seg.versions import VersionStore

logger = logging.getLogger(__name__)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train seg", description=__doc__.split("\n\n")[0])
    add_common_flags(p, "window | softpos (matching of the residual engine)")
    p.add_argument("--out", required=True, help="version store folder (adclick-seg-v<N> are written here)")
    p.add_argument("--n-train", type=int, default=20, help="defective images used for training")
    p.add_argument("--labels", choices=("masks", "boxes"), default="masks")
    p.add_argument("--steps", type=int, default=FitConfig.steps)
    p.add_argument("--keep", type=int, default=3)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    examples, labels, encoder = load_examples(args)
    train = [e for e in examples if e.masks][: args.n_train]
    if args.labels == "boxes":
        train = [as_boxes(e) for e in train]
    cfg = SegTrainConfig(fit=dataclasses.replace(FitConfig(), steps=args.steps), holdout=0.0)
    info, figures = train_version(train, labels, prompt_matrix(encoder, labels), VersionStore(args.out, args.keep),
                                  cfg, progress=lambda f, m: logger.info("%3.0f%% %s", 100 * f, m))
    print(f"{info.name} -> {info.path}  fit {figures['fit_seconds']} s  train metrics {figures['metrics']}")
    return 0

