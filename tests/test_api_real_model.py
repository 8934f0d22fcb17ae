"""The service with its real models (residual engine on the bundled EfficientNet-Lite0 weights; the zero-training
click mode, and the default `auto` choice, which serves the bundled learned ADClick averaged with the click mode)
on small synthetic textures: wiring, caching and a mask on the painted defect."""

from dataclasses import replace

import numpy as np
import pytest

from backend.app import create_app
from backend.services import build_services
from backend.settings import Settings
from tests.api_support import RecordingServer, Route, decode_mask, encode, interactive_body, iou, keypoint
from tests.conftest import texture


@pytest.fixture(scope="module", params=["residual", "auto"])
def setup(tmp_path_factory, request):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("real")
    normals = root / "normals"
    normals.mkdir()
    for i in range(3):
        (normals / f"n{i}.png").write_bytes(encode(texture(h=192, w=256, seed=10 + i)))
    settings = replace(
        Settings(), model_dir=root / "m", normal_dir=str(normals), warm_on_setup=False, device="cpu",
        predictor=request.param,
    )
    service = build_services(settings)
    with RecordingServer() as server:
        yield create_app(settings, service, start_jobs=False).test_client(), service, server


@pytest.mark.slow
def test_real_model_click_masks_the_painted_defect(setup):
    client, service, server = setup
    img = texture(h=192, w=256, seed=3)
    truth = np.zeros((192, 256), bool)
    truth[80:110, 150:185] = True
    img[truth] = (235, 235, 60)
    server.routes["/d.png"] = Route(encode(img))
    clicks = [
        keypoint(167 / 256 * 100, 95 / 192 * 100, w=256, h=192),
        keypoint(30 / 256 * 100, 30 / 192 * 100, positive=False, w=256, h=192),
    ]
    body = interactive_body(f"{server.url}/d.png", clicks)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    pred = resp.get_json()["results"][0]
    from model.interactive.learned import check_weights

    learned = service.settings.predictor == "auto" and check_weights(service.model.engine)[0] is not None
    assert pred["model_version"].startswith("adclick-" if learned else "residual-click-")
    # ADCLICK_REFINE defaults to the guided filter, ADCLICK_SEEDED to the click-seeded stage on top
    assert pred["model_version"].endswith("-refine-seeded")
    health = client.get("/health").get_json()["model"]
    assert health["kind"] == ("adclick" if learned else "residual-click")
    assert "guided boundary refinement on" in health["reason"] and "click-seeded stage on" in health["reason"]
    assert ("zero-training" in health["reason"]) != learned
    mask = decode_mask(pred["result"][0])
    assert mask.shape == (192, 256) and mask[95, 167] and not mask[30, 30]
    assert iou(mask, truth) > 0.5
    assert service.serving.model_for("1").n_references == 3
    again = client.post("/predict", json=body)
    assert again.status_code == 200 and service.serving.cache.snapshot()["hits"] >= 1
    batch = client.post("/predict", json={**body, "params": {"context": None}}).get_json()["results"][0]
    assert batch["score"] > 0 and batch["model_version"] == pred["model_version"]
