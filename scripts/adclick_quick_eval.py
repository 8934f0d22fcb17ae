"""Quick check of a trained ADClick checkpoint against the zero-training click mode on the first N test images
of each defect type (5 simulated clicks, no prompt, bank = every second train/good image, the engine config
the weights were trained with: Lite0 levels 4,10 with level norm, k_refs 10, window 4, sigma 4).

  python scripts/adclick_quick_eval.py --weights data/adclick_cpu/adclick.pt \
      --dataset ../shared/datasets/mvtec3d_tire --n 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.clickmode import ResidualClickPredictor
from model.clicks import simulate
from model.data import list_images
from model.features import BackboneConfig
from model.modeling.adclick import ARCH, AdClickConfig, AdClickNet
from model.predictor import AdClickPredictor
from model.residuals import ResidualConfig, ResidualEngine, load_image


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--cache-dir", default="data/adclick_cpu/banks")
    p.add_argument("--backbone", default='{"levels": [4, 10], "level_norm": true}',
                   help="BackboneConfig overrides (JSON): the engine the weights were trained with")
    p.add_argument("--residual", default='{"k_refs": 10, "window_radius": 4, "smooth_sigma": 4.0}',
                   help="ResidualConfig overrides (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dataset)
    bb = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.backbone).items()}
    engine = ResidualEngine(BackboneConfig(device="cpu", **bb), ResidualConfig(**json.loads(args.residual)),
                            cache_dir=args.cache_dir)
    bank = engine.build_bank([load_image(q) for q in list_images(root / "train" / "good")[::2]])
    ckpt = load_checkpoint(args.weights, expected_arch=ARCH)
    net = AdClickNet(AdClickConfig.from_dict(ckpt["config"]))
    net.load_state_dict(ckpt["state_dict"])
    predictors = {"adclick": AdClickPredictor(engine, bank, net, None, "adclick-eval"),
                  "residual": ResidualClickPredictor(engine, bank)}
    ious: dict[str, list] = {k: [] for k in predictors}
    for defect in sorted(d.name for d in (root / "test").iterdir() if d.name != "good"):
        for path in list_images(root / "test" / defect)[: args.n]:
            image = load_image(path)
            gt = np.asarray(Image.open(root / "ground_truth" / defect / f"{path.stem}_mask.png")) > 0
            for name, pred in predictors.items():
                sim = simulate(pred, pred.set_image(image), gt, max_clicks=5)
                ious[name].append(sim.ious + [sim.ious[-1]] * (5 - len(sim.ious)))
                print(defect, path.stem, name, " ".join(f"{v:.2f}" for v in sim.ious),
                      f"predict p50 {np.median(sim.predict_ms):.0f} ms")
    for name, rows in ious.items():
        m = np.mean(rows, axis=0)
        print(f"{name}: mIoU@1 {m[0]:.3f} @3 {m[2]:.3f} @5 {m[4]:.3f} over {len(rows)} images")


if __name__ == "__main__":
    main()
