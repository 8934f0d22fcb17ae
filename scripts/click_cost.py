"""How long one interactive /predict takes with N new clicks on one 800x600 image, with the served predictor
(the defaults of `make serve`, CPU), through the Flask app: the figures behind ADCLICK_MAX_CLICKS.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/click_cost.py 1 25 50 100
"""

from __future__ import annotations

import io
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from backend.app import create_app
from backend.settings import Settings
from tests.api_support import RecordingServer, Route, interactive_body, keypoint


def main(counts: list[int]) -> None:
    tmp = Path(tempfile.mkdtemp())
    settings = replace(
        Settings.from_env({"DEVICE": "cpu"}),
        model_dir=tmp / "models",
        warm_on_setup=False,
        max_clicks=max(counts),
    )
    client = create_app(settings, start_jobs=False).test_client()
    with RecordingServer() as srv:
        for n in counts:
            rng = np.random.default_rng(n)
            img = (128 + rng.normal(0, 8, (600, 800, 3))).clip(0, 255).astype(np.uint8)
            img[250:330, 350:450] = (200, 40, 40)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "PNG")
            srv.routes[f"/i{n}.png"] = Route(buf.getvalue())
            pick = random.Random(n)
            clicks = [
                keypoint(pick.uniform(44, 56), pick.uniform(42, 55), positive=i % 3 != 2, w=800, h=600)
                for i in range(n)
            ]
            url = f"{srv.url}/i{n}.png"
            client.post("/predict", json=interactive_body(url, clicks[:1]))  # download + image state first
            t0 = time.perf_counter()
            resp = client.post("/predict", json=interactive_body(url, clicks))
            print(f"{n} new clicks: HTTP {resp.status_code} in {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 25, 50, 100])
