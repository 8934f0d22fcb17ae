"""Training dispatcher: `python -m model.train adclick|seg ...`.

adclick: the learned interactive network (model/training/train_adclick.py: main);
seg: ADClick-Seg (model/seg/train.py: main).
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Optional, Sequence

TARGETS = {"adclick": "model.training.train_adclick", "seg": "model.seg.train"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TARGETS:
        sys.stderr.write(f"usage: python -m model.train {{{'|'.join(TARGETS)}}} [options]\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(TARGETS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
