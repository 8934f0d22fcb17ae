"""Make docs/images/click_mask.png: a mask the backend produced from clicks, for the README.

It runs the real service in-process (create_app with the default model: the residual click mode over the
bundled backbone, no Label Studio needed): a synthetic tread image with a painted gouge (tests/fixtures/images.py),
four defect-free references, POST /setup, then POST /predict with the context Label Studio's editor sends for two
positive clicks and one negative (Alt) click. The picture shows the clicks and the decoded brush mask.

    .venv/bin/python scripts/make_readme_figure.py [--out docs/images/click_mask.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.app import create_app
from backend.settings import Settings
from tests.e2e.ls_api import LABEL_CONFIG, decode_mask, keypoint
from tests.fixtures.images import NEGATIVE_CLICK, POSITIVE_CLICKS, write_dataset


def run_backend(root: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    data = write_dataset(root / "files", n_defective=1, n_normal=0)
    settings = Settings(model_dir=root / "models", normal_dir=str(data.normal_dir), device="cpu",
                        local_files_root=str(root / "files"), warm_on_setup=False, bank_wait_s=600.0)
    client = create_app(settings, start_jobs=False).test_client()
    setup = client.post("/setup", json={"project": "1.0", "schema": LABEL_CONFIG})
    assert setup.status_code == 200, setup.get_json()
    clicks = [keypoint(x, y, True, i) for i, (x, y) in enumerate(POSITIVE_CLICKS)]
    clicks.append(keypoint(*NEGATIVE_CLICK, positive=False, n=len(clicks)))
    task = {"id": 1, "data": {"image": f"/data/local-files/?d=tasks/{data.defective[0]}"}}
    answer = client.post("/predict", json={"tasks": [task], "project": "1.0", "label_config": LABEL_CONFIG,
                                           "params": {"context": {"result": clicks}}})
    assert answer.status_code == 200, answer.get_json()
    prediction = answer.get_json()["results"][0]
    image = np.array(Image.open(data.task_dir / data.defective[0]).convert("RGB"))
    return image, decode_mask(prediction["result"][0]), prediction


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, colour: tuple, scale: int) -> None:
    r = 5 * scale // 2
    cx, cy = x * scale, y * scale
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(255, 255, 255), width=2)


def render(image: np.ndarray, mask: np.ndarray, scale: int = 2) -> Image.Image:
    """Two panels: the image with the clicks (green = positive, red = negative), and the mask over it."""
    h, w = mask.shape
    overlay = image.astype(np.float32)
    overlay[mask] = 0.45 * overlay[mask] + 0.55 * np.array([40, 120, 255])
    edge = mask ^ np.pad(mask, 1)[1:-1, :-2] | mask ^ np.pad(mask, 1)[:-2, 1:-1]
    overlay[edge] = (255, 255, 0)
    panels = []
    for arr in (image, overlay.astype(np.uint8)):
        panel = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(panel)
        for x, y in POSITIVE_CLICKS:
            _dot(draw, x, y, (30, 200, 60), scale)
        _dot(draw, *NEGATIVE_CLICK, (230, 40, 40), scale)
        panels.append(panel)
    gap = 8
    out = Image.new("RGB", (2 * w * scale + gap, h * scale), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (w * scale + gap, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "click_mask.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        image, mask, prediction = run_backend(Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(image, mask).save(args.out, optimize=True)
    print(f"{args.out}: model_version {prediction['model_version']}, score {prediction['score']}, "
          f"mask {int(mask.sum())} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
