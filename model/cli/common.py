"""What the command lines share: the dataset / engine flags (`add_common_flags`) and the logging setup.

Used by model/cli/bench.py (anomaly, clicks, boxes), model/cli/bench_fit.py and model/cli/train_seg.py; the
library behind them reads these flags from the parsed namespace (model/evaluation/runs.py).
"""
from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_common_flags(p: argparse.ArgumentParser, match_help: str) -> None:
    p.add_argument("--dataset", required=True, help="MVTec-AD-style folder")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--refs", default="all",
                   help="defect-free references: N or 'all' (anomaly: a comma list, one run each)")
    p.add_argument("--match", default="window", help=match_help)
    p.add_argument("--limit", type=int, default=None, help="at most N test images per defect type")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subset")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cache-dir",
                   help="bank cache (default: a fresh temporary folder, so the build time is real)")
    p.add_argument("--no-validation", action="store_true", help="do not use validation/good as references")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (one line per image)")
    p.add_argument("--backbone-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="BackboneConfig override, e.g. input_size=448 (repeatable)")
    p.add_argument("--residual-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="ResidualConfig override, e.g. k_refs=5 (repeatable)")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
