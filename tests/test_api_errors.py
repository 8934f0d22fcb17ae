"""Bad input never crashes the server: each case gets a JSON {"error": ...} naming the problem with a 4xx/502,
and the server keeps answering afterwards."""

from dataclasses import replace

import numpy as np
import pytest

from backend.settings import Settings
from tests.api_support import (
    CONTRACT_CONFIG,
    RecordingServer,
    Route,
    decode_mask,
    defect_image,
    encode,
    interactive_body,
    iou,
    keypoint,
    make_app,
)


@pytest.fixture(scope="module")
def server():
    with RecordingServer() as srv:
        img, _ = defect_image()
        srv.routes["/ok.png"] = Route(encode(img))
        srv.routes["/text"] = Route(b"hello, I am not an image")
        srv.routes["/big.png"] = Route(encode(np.zeros((600, 800, 3), np.uint8)))
        srv.routes["/slow.png"] = Route(encode(img), delay_s=1.5)
        srv.routes["/missing.png"] = Route(b"no", status=404)
        yield srv


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = replace(
        Settings(),
        model_dir=tmp_path_factory.mktemp("m"),
        warm_on_setup=False,
        image_timeout_s=0.5,
        max_image_pixels=200_000,
    )
    app, _, _ = make_app(settings)
    return app.test_client()


def post(client, body=None, raw=None):
    if raw is not None:
        return client.post("/predict", data=raw, content_type="application/json")
    return client.post("/predict", json=body)


CASES = [
    ("malformed JSON", {"raw": "{tasks: ["}, 400, "not valid JSON"),
    ("JSON array body", {"raw": "[1, 2]"}, 400, "JSON object"),
    ("missing tasks", {"body": {"project": "1", "label_config": None}}, 400, "tasks must be a list"),
    ("empty tasks", {"body": {"tasks": [], "project": "1"}}, 400, "tasks is empty"),
    (
        "no label config",
        {"body": {"tasks": [{"id": 1}], "project": "1", "params": {"context": None}}},
        422,
        "no label config",
    ),
    (
        "task without data",
        {
            "body": {
                "tasks": [{"id": 1}],
                "project": "1",
                "label_config": CONTRACT_CONFIG,
                "params": {"context": None},
            }
        },
        400,
        "task 1 has no data object",
    ),
    (
        "image key missing",
        {
            "body": {"tasks": [{"id": 2, "data": {"img": "x"}}], "project": "1", "label_config": CONTRACT_CONFIG}
        },
        400,
        "no image under data.image",
    ),
    ("no project", {"body": {"tasks": [{"id": 2, "data": {"image": "x"}}]}}, 400, "names no project"),
]


@pytest.mark.parametrize("name, kw, status, words", CASES, ids=[c[0] for c in CASES])
def test_malformed_requests(client, name, kw, status, words):
    import re

    resp = post(client, **kw)
    assert resp.status_code == status, resp.get_json()
    assert re.search(words, resp.get_json()["error"])


def ask(client, server, path="/ok.png", clicks=None, **kw):
    clicks = clicks if clicks is not None else [keypoint(62.5, 41.7)]
    local = path.startswith("/") and not path.startswith("/data/")
    return post(client, interactive_body(f"{server.url}{path}" if local else path, clicks, **kw))


@pytest.mark.parametrize(
    "path, clicks, status, words",
    [
        ("/ok.png", [keypoint(62.5, 41.7, label="Crack")], 422, "'Crack' is not a value of BrushLabels"),
        ("/ok.png", [keypoint(130.0, 20.0)], 400, "outside the image"),
        ("/ok.png", [keypoint(50, 50), keypoint(20, 20, label="Dent")], 400, "several labels"),
        ("/ok.png", [{"type": "keypointlabels", "value": "x"}], 400, "no value object"),
        ("/text", None, 415, "not an image"),
        ("/big.png", None, 413, "800x600 = 480000 pixels, over the limit of 200000"),
        ("/slow.png", None, 502, "timed out"),
        ("/missing.png", None, 502, "HTTP 404"),
        ("http://127.0.0.1:9/none.png", None, 502, "cannot reach 127.0.0.1:9"),
        ("/data/upload/1/x.png", None, 502, "LABEL_STUDIO_URL is not set"),
        ("s3://bucket/x.png", None, 400, "needs the task id"),
    ],
    ids=[
        "unknown-label",
        "click-outside",
        "mixed-labels",
        "bad-region",
        "non-image",
        "too-many-pixels",
        "timeout",
        "http-404",
        "unreachable",
        "ls-path-without-url",
        "cloud-no-task-id",
    ],
)
def test_bad_tasks_and_contexts(client, server, path, clicks, status, words):
    if path.startswith("s3://"):
        body = interactive_body(path, clicks or [keypoint(50, 50)])
        body["tasks"][0].pop("id")
        resp = post(client, body)
    else:
        resp = ask(client, server, path, clicks)
    assert resp.status_code == status, resp.get_json()
    assert words in resp.get_json()["error"]


def test_config_without_brushlabels_at_predict(client, server):
    resp = ask(client, server, config="<View><Image name='image' value='$image'/></View>")
    assert resp.status_code == 422 and "BrushLabels" in resp.get_json()["error"]


def test_rotated_image_mask_follows_the_displayed_orientation(client, server):
    img, truth = defect_image(h=96, w=128, center=(100, 20), radius=10)
    server.routes["/rotated.jpg"] = Route(encode(img, exif_orientation=6))  # displayed 96 wide, 128 high
    shown = np.rot90(truth, k=-1)
    ys, xs = np.nonzero(shown)
    x_pct, y_pct = xs.mean() / 96 * 100, ys.mean() / 128 * 100
    resp = ask(client, server, "/rotated.jpg", [keypoint(x_pct, y_pct, w=96, h=128)])
    assert resp.status_code == 200, resp.get_json()
    region = resp.get_json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (96, 128)
    assert iou(decode_mask(region), shown) > 0.8


def test_the_server_keeps_serving_after_all_that(client, server):
    assert client.get("/health").status_code == 200
    assert ask(client, server).status_code == 200
    errors = client.get("/metrics").get_json()["routes"]["POST /predict"]["by_status"]
    assert errors.get("500") is None


def test_a_failing_task_in_a_batch_is_named(client, server):
    tasks = [
        {"id": 11, "data": {"image": f"{server.url}/ok.png"}},
        {"id": 12, "data": {"image": f"{server.url}/text"}},
    ]
    resp = post(
        client, {"tasks": tasks, "project": "1", "label_config": CONTRACT_CONFIG, "params": {"context": None}}
    )
    assert resp.status_code == 415 and resp.get_json()["error"].startswith("task 12: ")
