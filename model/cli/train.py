"""Training dispatcher: `python -m model.train adclick|seg ...`.

adclick: the learned interactive network (model/cli/train_adclick.py: main);
seg: ADClick-Seg (model/cli/train_seg.py: main).
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

TARGETS = {"adclick": "model.cli.train_adclick", "seg": "model.cli.train_seg"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TARGETS:
        sys.stderr.write(f"usage: python -m model.train {{{'|'.join(TARGETS)}}} [options]\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(TARGETS[argv[0]])  # only the chosen tool's imports are paid for
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
