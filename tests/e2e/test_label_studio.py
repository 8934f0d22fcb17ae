"""The backend behind a real Label Studio 1.23.2, driven through Label Studio's own REST API: the calls its
editor and its project pages make (connect, smart clicks, annotations -> webhook, train, retrieve predictions).

Tests run in file order and share one project; each one states what it needs from the earlier ones."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.e2e.ls_api import decode_mask, keypoint
from tests.e2e.processes import wait_for
from tests.fixtures.images import NEGATIVE_CLICK, POSITIVE_CLICKS, H, W

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABEL = "Dent"


LS_SETUP_TIMEOUT_S = 3.0  # Label Studio 1.23's ML_TIMEOUT_SETUP: a slower /setup fails "Validate and Save"


def test_cold_setup_fits_label_studios_timeout(project):
    assert project.cold_setup_s < LS_SETUP_TIMEOUT_S, (
        f"the first /setup of a fresh backend took {project.cold_setup_s:.1f} s; Label Studio gives up after "
        f"{LS_SETUP_TIMEOUT_S:.0f} s and refuses to connect the model")


def test_backend_is_connected(label_studio, backend, dataset, project):
    ml = label_studio.api.call("GET", f"/api/ml/{project.ml}")
    assert ml["state"] == "CO", f"Label Studio reports the backend as {ml['state']}: {ml.get('error_message')}"
    assert ml["is_interactive"] is True
    refs = backend.get("/health")["reference_images"]
    assert refs["normal_dir"] == len(list(dataset.normal_dir.iterdir())) == refs["projects"][str(project.id)], refs
    routes = backend.get("/metrics")["routes"]
    assert routes.get("POST /setup", {}).get("by_status", {}).get("200", 0) >= 1, routes
    versions = label_studio.api.versions(project.ml)  # LS proxies GET /versions (404 = "upgrade your backend")
    served = backend.get("/versions", project=project.id)["model_version"]
    assert served in str(versions)
    _card_follows(label_studio, project, served)


def _card_follows(label_studio, project, version: str) -> None:
    """Label Studio 1.23 shows no version on the model card and points the project's model version (the Data
    Manager's prediction score, prelabeling) at the card's title: the backend renames the card to the served
    version, and Label Studio moves the project's model version along."""
    def renamed():
        ml = label_studio.api.call("GET", f"/api/ml/{project.ml}")
        return ml if ml["title"] == version else None
    wait_for(f"the model card renamed to {version}", renamed, timeout_s=30)
    assert label_studio.api.call("GET", f"/api/projects/{project.id}")["model_version"] == version


def test_clicks_segment_the_defect(label_studio, dataset, project):
    task = project.tasks[dataset.defective[0]]
    clicks = [keypoint(x, y, True, i) for i, (x, y) in enumerate(POSITIVE_CLICKS)]
    clicks.append(keypoint(*NEGATIVE_CLICK, positive=False, n=len(clicks)))
    answer = label_studio.api.interactive(project.ml, task["id"], {"result": clicks})

    prediction = answer["data"]
    items = prediction["result"]
    assert len(items) == 1, items
    item = items[0]
    assert item["type"] == "brushlabels" and item["from_name"] == "mask" and item["to_name"] == "image"
    assert item["value"]["brushlabels"] == [LABEL] and item["value"]["format"] == "rle"
    assert isinstance(item["id"], str) and (item["original_width"], item["original_height"]) == (W, H)
    mask = decode_mask(item)
    truth = dataset.mask
    recall = (mask & truth).sum() / truth.sum()
    precision = (mask & truth).sum() / max(mask.sum(), 1)
    assert recall >= 0.8, f"the mask covers only {recall:.0%} of the defect"
    assert precision >= 0.35, f"only {precision:.0%} of the mask lies on the defect ({mask.sum()} px)"
    nx, ny = map(int, NEGATIVE_CLICK)
    assert not mask[ny, nx], "the mask covers the negative click"
    for x, y in POSITIVE_CLICKS:
        assert mask[int(y), int(x)], f"the mask misses the positive click at ({x}, {y})"
    assert 0.0 <= float(item["score"]) <= 1.0 and prediction["model_version"]


def _annotation_from_mask(mask_item: dict, verdict: str) -> list[dict]:
    result = [{"id": "verdict1", "from_name": "verdict", "to_name": "image", "type": "choices",
               "value": {"choices": [verdict]}}]
    if mask_item is not None:
        result.append({k: mask_item[k] for k in ("id", "from_name", "to_name", "type", "original_width",
                                                 "original_height", "image_rotation", "value")})
    return result


def test_annotation_reaches_the_webhook(label_studio, backend, dataset, project):
    """An annotator accepts the clicked mask: Label Studio posts ANNOTATION_CREATED to <backend>/webhook."""
    task = project.tasks[dataset.defective[1]]
    clicks = [keypoint(x, y, True, i) for i, (x, y) in enumerate(POSITIVE_CLICKS)]
    item = label_studio.api.interactive(project.ml, task["id"], {"result": clicks})["data"]["result"][0]
    before = backend.get("/metrics")["routes"].get("POST /webhook", {}).get("count", 0)
    label_studio.api.create_annotation(task["id"], _annotation_from_mask(item, "Anomalous"))

    def received():
        routes = backend.get("/metrics")["routes"]
        return routes.get("POST /webhook", {}).get("by_status", {}).get("201", 0) > 0 and \
            routes["POST /webhook"]["count"] > before
    wait_for("the ANNOTATION_CREATED webhook", received, timeout_s=30)
    job = backend.get("/health")["training"]["jobs"].get(str(project.id))
    assert job is not None and (job["pending_events"] >= 1 or job["runs"] >= 1), job


def test_training_and_predictions(label_studio, backend, dataset, project):
    """The annotator accepts the clicked mask of a second defective image and gives an OK verdict on a normal
    image, then Start Training on the model page: the backend accepts the job, adds the image to the project's
    references, trains ADClick-Seg on the annotated masks and publishes a new model_version; every task's
    retrieved prediction carries it, finds the defect where there is one, and defective images score above the
    normal one. The same job adapts the interactive network to the annotations: a new interactive version
    answers the clicks, with a mask on the annotated defect at least as good as before."""
    good = project.tasks[dataset.normal[0]]
    clicks = [keypoint(x, y, True, i) for i, (x, y) in enumerate(POSITIVE_CLICKS)]
    defect_task = project.tasks[dataset.defective[0]]["id"]
    click_before = label_studio.api.interactive(project.ml, defect_task, {"result": clicks})["data"]
    # two annotated defects: adaptation trains on one and holds the other out to validate on
    label_studio.api.create_annotation(defect_task, _annotation_from_mask(click_before["result"][0], "Anomalous"))
    label_studio.api.create_annotation(good["id"], _annotation_from_mask(None, "OK"))
    before = backend.get("/versions", project=project.id)["model_version"]
    label_studio.api.train(project.ml)  # 200 only when the backend accepted the START_TRAINING webhook

    def trained():
        job = backend.get("/health")["training"]["jobs"].get(str(project.id)) or {}
        if job.get("last_status") == "failed":
            raise AssertionError(f"training failed: {job.get('reason')}")
        return job if job.get("last_status") == "done" and job.get("status") != "running" else None
    job = wait_for("the training job", trained, timeout_s=180)
    assert job["figures"]["ok_tasks"] >= 1 and job["figures"]["references_added_from_tasks"] >= 1, job
    version = backend.get("/versions", project=project.id)["model_version"]
    assert version == job["model_version"] and version != before
    assert version.startswith("adclick-seg-v"), f"the annotated mask did not train ADClick-Seg: {job}"
    _card_follows(label_studio, project, version)

    # the job also adapted the interactive network to the references and the annotated masks (one trained on,
    # one held out). A 30-second adaptation on this small project validates better in only some runs on 2 cores
    # (2 of 6 tries), since the shipped network already scores 0.98 on the held-out annotation: when it does, the new interactive version answers the clicks in Label Studio and is at least as good
    # on the annotated defect; when it does not, /health says why and the clicks keep the version served before
    figures = job["figures"]
    adapted = figures.get("interactive_adaptation")
    assert adapted in ("published", "kept"), figures
    assert figures["interactive_score"] is not None and figures["interactive_base_score"] is not None, figures
    health = backend.get("/health")["interactive_adaptation"]["projects"][str(project.id)]
    assert health["status"] == adapted and health["reason"], health
    click_after = label_studio.api.interactive(project.ml, defect_task, {"result": clicks})["data"]
    if adapted == "published":
        name = figures["interactive_version"]
        assert figures["interactive_score"] > figures["interactive_base_score"], figures
        assert health["version"] == name and name in backend.get("/versions", project=project.id)["versions"]
        assert click_after["model_version"] == name, click_after["model_version"]
        truth = dataset.mask
        quality = [_iou(decode_mask(p["result"][0]), truth) for p in (click_before, click_after)]
        assert quality[1] >= quality[0] - 0.02, f"IoU with the defect before / after adaptation: {quality}"
    else:
        assert "not 0.005 better" in health["reason"], health
        assert not click_after["model_version"].startswith("adclick-adapted"), click_after["model_version"]

    label_studio.api.retrieve_predictions(project.id)
    found = {}
    for name, task in project.tasks.items():
        preds = wait_for(f"a prediction of {name}", lambda t=task["id"]: label_studio.api.predictions(t), 120)
        assert [p["model_version"] for p in preds] == [version], (name, preds)
        found[name] = _summary(preds[0], dataset.mask)
    for name in dataset.defective:
        assert found[name]["verdict"] == ["Anomalous"], found
        assert found[name]["defect_recall"] >= 0.5, found
    for name in dataset.normal:
        assert found[name]["verdict"] == ["OK"], found
    worst_normal = max(found[n]["score"] for n in dataset.normal)
    assert all(found[d]["score"] > worst_normal for d in dataset.defective), found
    # the Data Manager's "Prediction score" column: Label Studio averages the predictions of the project's
    # model version, which followed the card's title to the new version
    scores = {t["id"]: t.get("predictions_score") for t in label_studio.api.tasks(project.id)}
    assert all(v is not None for v in scores.values()), scores


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _summary(prediction: dict, truth: np.ndarray) -> dict:
    """The verdict, the image score and how much of the defect the predicted brush regions cover."""
    masks = [decode_mask(r) for r in prediction["result"] if r["type"] == "brushlabels"]
    union = np.logical_or.reduce(masks) if masks else np.zeros_like(truth)
    verdict = [c for r in prediction["result"] if r["type"] == "choices" for c in r["value"]["choices"]]
    return {"score": float(prediction["score"]), "verdict": verdict, "regions": len(masks),
            "defect_recall": round(float((union & truth).sum() / truth.sum()), 3)}


def test_personal_access_token_downloads_task_images(label_studio, dataset, tmp_path):
    """LABEL_STUDIO_API_KEY may be a personal access token (a JWT refresh token; sent as is it gets 401): the
    backend's image loader exchanges it at /api/token/refresh/ and downloads the task image pixel-exact from
    Label Studio's local-files storage. A token Label Studio never issued fails with an error naming the 401."""
    from backend.errors import BackendError
    from backend.images import ImageLoader
    from backend.settings import Settings

    api = label_studio.api
    pid = api.create_project("ADClick e2e: personal access token")
    tasks = api.import_local_files(pid, str(dataset.task_dir), expected=len(dataset.defective + dataset.normal))
    task = next(t for t in tasks if t["data"]["image"].endswith(dataset.defective[0]))
    pat = api.call("POST", "/api/token/")["token"]

    def loader(key: str) -> ImageLoader:
        return ImageLoader(Settings(label_studio_url=label_studio.url, label_studio_api_key=key,
                                    model_dir=tmp_path / key[:8], download_cache_bytes=0))
    with_pat = loader(pat)
    image = with_pat.load(task["data"]["image"], task["id"]).array
    expected = np.asarray(Image.open(dataset.task_dir / dataset.defective[0]).convert("RGB"))
    assert np.array_equal(image, expected)
    assert with_pat.auth.refresh_count >= 1

    forged = pat[:-6] + ("AAAAAA" if not pat.endswith("AAAAAA") else "BBBBBB")
    with pytest.raises(BackendError, match="401"):
        loader(forged).load(task["data"]["image"], task["id"])
