"""The learning-loop fit against a stand-in Label Studio read with the real SDK client: paginated tasks,
newest annotation per task, skipped annotations ignored, masks/boxes/verdicts -> a published ADClick-Seg
version (checkpoint, metrics, report) that the batch detector loads."""
from __future__ import annotations

import json
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend import training
from backend.images import ImageLoader
from backend.ls_format import brush_region, parse_label_config
from backend.projects import ProjectStore
from backend.seg_labels import newest_annotation, task_labels
from backend.settings import Settings
from model.seg.data import ANY
from model.seg.predict import SegDetector
from tests.api_support import CONTRACT_CONFIG, RecordingServer, Route, encode

torch.set_num_threads(1)
CFG = parse_label_config(CONTRACT_CONFIG)
H, W = 96, 128


def image_with_defect(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:H, 0:W]
    base = 110 + 30 * np.sin(xx / 3.0)[..., None] + rng.normal(0, 4, (H, W, 3))
    mask = np.zeros((H, W), bool)
    if defect:
        r, c = int(rng.integers(10, H - 30)), int(rng.integers(10, W - 30))
        mask[r:r + 16, c:c + 16] = True
        base[mask] = (235, 40, 40)
    return np.clip(base, 0, 255).astype(np.uint8), mask


def ann(result, ann_id=1, updated="2026-01-01T00:00:00Z", cancelled=False):
    return {"id": ann_id, "result": result, "was_cancelled": cancelled, "updated_at": updated}


def verdict(choice):
    return {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}


def rectangle(mask, label="Scratch"):
    rows, cols = np.nonzero(mask)
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "value": {"x": 100 * cols.min() / W, "y": 100 * rows.min() / H,
                                            "width": 100 * (cols.max() + 1 - cols.min()) / W,
                                            "height": 100 * (rows.max() + 1 - rows.min()) / H,
                                            "rectanglelabels": [label]}}


class FakeLabelStudio:
    """GET /api/tasks/ paginated (2 per page) and the task images; records which pages were read."""

    def __init__(self, server):
        self.server, self.tasks, self.pages = server, [], []
        server.routes["/api/tasks/"] = Route(handler=self._tasks)

    def add(self, task_id, annotations, image):
        self.server.routes[f"/data/upload/1/{task_id}.png"] = Route(encode(image))
        self.tasks.append({"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"},
                           "annotations": annotations})

    def _tasks(self, handler, body):
        page = int(parse_qs(urlparse(handler.path).query).get("page", ["1"])[0])
        self.pages.append(page)
        items = self.tasks[(page - 1) * 2: page * 2]
        if not items and page > 1:
            return 404, {"Content-Type": "application/json"}, b'{"detail": "Invalid page."}'
        return 200, {"Content-Type": "application/json"}, json.dumps({"tasks": items, "total": len(self.tasks)}).encode()


class FakeText:
    dim = 16

    def prompt_vector(self, label, text="", object_name=""):
        g = torch.Generator().manual_seed(sum(map(ord, label)))
        return F.normalize(torch.randn(self.dim, generator=g), dim=0)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    from label_studio_sdk.client import LabelStudio

    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualEngine

    monkeypatch.setattr(training, "text_encoder", lambda: FakeText())
    with RecordingServer() as server:
        settings = replace(Settings(), model_dir=tmp_path / "m", label_studio_url=server.url,
                           label_studio_api_key="legacy-token")
        projects = ProjectStore(settings.model_dir)
        projects.update("1", CONTRACT_CONFIG, {"seg_fit_steps": 12, "seg_keep_versions": 2})
        progress = []
        ctx = training.TrainingContext(
            settings=settings, progress=lambda f, m: progress.append(f),
            client_factory=lambda: LabelStudio(base_url=server.url, api_key="legacy-token"),
            image_loader=ImageLoader(settings),
            engine=ResidualEngine(BackboneConfig(input_size=128, device="cpu"), cache_dir=tmp_path / "c"),
            projects=projects, base_version="test")
        yield FakeLabelStudio(server), ctx, progress


def test_fit_trains_and_publishes_from_the_newest_labels(world) -> None:
    ls, ctx, progress = world
    for t in range(1, 5):  # defects drawn with the brush
        img, mask = image_with_defect(t, True)
        ls.add(t, [ann([brush_region(mask, "Scratch", CFG, 1.0), verdict("Anomalous")])], img)
    img, mask = image_with_defect(5, True)  # boxes only
    ls.add(5, [ann([rectangle(mask), verdict("Anomalous")])], img)
    img, mask = image_with_defect(6, True)  # an older mask, then the newest annotation says OK: OK wins
    ls.add(6, [ann([brush_region(mask, "Dent", CFG, 1.0)], 1, "2026-01-01T00:00:00Z"),
               ann([verdict("OK")], 2, "2026-02-01T00:00:00Z")], image_with_defect(6, False)[0])
    img, mask = image_with_defect(7, True)  # skipped: ignored
    ls.add(7, [ann([brush_region(mask, "Dent", CFG, 1.0)], cancelled=True)], img)
    for t in (8, 9, 10):
        ls.add(t, [ann([verdict("OK")])], image_with_defect(t, False)[0])

    out = training.fit("1", {"action": "START_TRAINING", "project": {"id": 1}}, ctx)
    assert out["model_version"] == "adclick-seg-v1"
    assert sorted(set(ls.pages))[:5] == [1, 2, 3, 4, 5]  # every page of 10 tasks, 2 per page
    assert out["seg_labelled_tasks"] == 9  # task 7 (skipped) teaches nothing
    assert out["seg_located_defects"] == 5 and out["seg_examples"] == 9
    assert out["ok_tasks"] == 4  # 6 (newest annotation), 8, 9, 10
    assert progress == sorted(progress) and progress[-1] == 1.0
    store = ProjectStore(ctx.settings.model_dir).version_store("1")
    info = store.latest()
    assert info.name == "adclick-seg-v1" and (info.path / "report.png").is_file()
    assert info.meta["n_masks"] + info.meta["n_heldout"] >= 4 and info.meta["n_boxes"] == 1
    assert {"pixel_ap", "au_pro", "pixel_auroc"} <= set(info.meta["metrics"])
    ckpt, _ = store.load()
    assert ckpt["labels"] == ["Scratch", "Dent"]
    det = SegDetector(ckpt, info.name)
    img, _ = image_with_defect(42, True)
    bank = ctx.engine.build_bank(ctx.projects.reference_images("1", 50))
    res = det.detect(ctx.engine.compute(img, bank), ["Scratch", "Dent"])
    assert res.anomaly_map.shape == (H, W)
    # "Dent" only appears in a superseded and a skipped annotation: not learned, so it names no region
    assert info.meta["learned_labels"] == ["Scratch"] and set(res.masks) == {ANY, "Scratch"}

    again = training.fit("1", {"action": "START_TRAINING", "project": {"id": 1}}, ctx)
    assert again["model_version"] == "adclick-seg-v2"
    assert [v.name for v in store.list()] == ["adclick-seg-v1", "adclick-seg-v2"]


def test_fit_without_located_defects_keeps_the_reference_version(world) -> None:
    ls, ctx, _ = world
    for t in (1, 2):
        ls.add(t, [ann([verdict("OK")])], image_with_defect(t, False)[0])
    ls.add(3, [ann([verdict("Anomalous")])], image_with_defect(3, True)[0])
    out = training.fit("1", {"action": "START_TRAINING", "project": {"id": 1}}, ctx)
    assert out["model_version"].startswith("test-refs-")
    assert "seg_metrics" not in out  # an anomalous verdict alone does not locate a defect
    assert ProjectStore(ctx.settings.model_dir).version_store("1").latest() is None


# ---- annotation parsing (pure) ------------------------------------------------------------------------------
def test_newest_annotation_and_labels_from_regions() -> None:
    _, mask = image_with_defect(1, True)
    task = {"id": 3, "data": {"image": "x.png"}, "annotations": [
        ann([verdict("OK")], 1, "2026-03-01T00:00:00Z", cancelled=True),
        ann([brush_region(mask, "scratch", CFG, 1.0), rectangle(mask, "Dent")], 2, "2026-02-01T00:00:00Z"),
        ann([verdict("OK")], 3, "2026-01-01T00:00:00Z")]}
    assert newest_annotation(task)["id"] == 2
    tl = task_labels(task, CFG)
    assert list(tl.masks) == ["Scratch"] and np.array_equal(tl.masks["Scratch"], mask)  # label matched
    (label, box), = tl.boxes
    rows, cols = np.nonzero(mask)
    assert label == "Dent" and np.allclose(box, (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    assert tl.verdict is None and tl.size == (H, W)
    assert task_labels({"id": 4, "annotations": [ann([], cancelled=True)]}, CFG) is None
    assert task_labels({"id": 5, "annotations": [ann([verdict("Anomalous")])]}, CFG).verdict is True
    unknown = brush_region(mask, "Crack", CFG, 1.0)  # not a BrushLabels value: still a defect (any-map)
    assert list(task_labels({"id": 6, "annotations": [ann([unknown])]}, CFG).masks) == [ANY]
