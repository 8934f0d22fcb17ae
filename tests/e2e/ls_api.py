"""The few Label Studio REST calls the end-to-end test makes, with the legacy `Token` header. Every call
checks its HTTP status and shows the answer's body when it is not the expected one."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import requests
from label_studio_sdk.converter.brush import decode_rle

from tests.fixtures.images import H, W

# The label config of ../shared/docs/CONTRACT.md (also in README.md).
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Scratch"/><Label value="Dent"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
    <Label value="Scratch"/><Label value="Dent"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true" smartOnly="true">
    <Label value="Scratch"/><Label value="Dent"/>
  </RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" maxSubmissions="1" placeholder="describe the defect"/>
  <Choices name="verdict" toName="image" choice="single">
    <Choice value="OK"/><Choice value="Anomalous"/>
  </Choices>
</View>"""


def keypoint(x: float, y: float, positive: bool, n: int, label: str = "Dent", width: int = W,
             height: int = H) -> dict:
    """A smart keypoint region exactly as the 1.23.2 editor sends it (percent coordinates)."""
    return {"id": f"kp{n}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": positive,
            "value": {"x": 100.0 * x / width, "y": 100.0 * y / height, "width": 0.6, "keypointlabels": [label]}}


def decode_mask(item: dict) -> np.ndarray:
    """A brushlabels result item -> (H, W) bool (the RLE holds 4 channels per pixel)."""
    h, w = item["original_height"], item["original_width"]
    flat = np.asarray(decode_rle(item["value"]["rle"]), dtype=np.uint8)
    assert flat.size == h * w * 4, f"RLE decodes to {flat.size} values, expected {h}x{w}x4"
    return flat.reshape(h, w, 4)[:, :, 3] > 127


class LabelStudioAPI:
    def __init__(self, url: str, token: str, timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        resp = self.http.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        if resp.status_code not in expect:
            raise AssertionError(f"{method} {path} -> {resp.status_code}: {resp.text[:1500]}")
        return resp.json() if resp.content else None

    # -- projects and tasks ----------------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str = LABEL_CONFIG) -> int:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def import_local_files(self, project: int, folder: str, expected: int, timeout_s: float = 60.0) -> list[dict]:
        """Local-files storage over `folder` (inside the document root), synced; returns the project's tasks."""
        storage = self.call("POST", "/api/storages/localfiles", json={
            "project": project, "title": "e2e images", "path": folder, "regex_filter": r".*\.png$",
            "use_blob_urls": True})
        self.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
        end = time.monotonic() + timeout_s
        while True:  # the sync may finish in the background
            tasks = self.tasks(project)
            if len(tasks) >= expected or time.monotonic() > end:
                return tasks
            time.sleep(1.0)

    def tasks(self, project: int) -> list[dict]:
        body = self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
        return body["tasks"] if isinstance(body, dict) else body

    def create_annotation(self, task: int, result: list[dict]) -> dict:
        return self.call("POST", f"/api/tasks/{task}/annotations", json={"result": result})

    # -- the ML backend --------------------------------------------------------------------------------------
    def connect_backend(self, project: int, url: str, extra_params: dict | None = None,
                        title: str = "ADClick") -> dict:
        """Settings > Model > Connect Model with "Interactive preannotations" on; `extra_params` are the
        model's extra parameters (Label Studio passes them to /setup)."""
        return self.call("POST", "/api/ml", json={"project": project, "url": url, "title": title,
                                                  "is_interactive": True, "auth_method": "NONE",
                                                  "extra_params": extra_params or {}})

    def interactive(self, ml: int, task: int, context: dict) -> dict:
        """Label Studio answers 200 either way: {"data": prediction} or {"errors": [the backend's error]}."""
        body = self.call("POST", f"/api/ml/{ml}/interactive-annotating", json={"task": task, "context": context})
        if not isinstance(body, dict) or "data" not in body:
            raise AssertionError(f"interactive-annotating gave no prediction: {str(body)[:1500]}")
        return body

    def train(self, ml: int) -> Any:
        return self.call("POST", f"/api/ml/{ml}/train", json={})

    def versions(self, ml: int) -> dict:
        return self.call("GET", f"/api/ml/{ml}/versions")

    def retrieve_predictions(self, project: int) -> Any:
        return self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                           "project": project},
                         json={"selectedItems": {"all": True, "excluded": []}})

    def predictions(self, task: int, model_version: str | None = None) -> list[dict]:
        items = self.call("GET", "/api/predictions", params={"task": task})
        return [p for p in items if model_version is None or p.get("model_version") == model_version]
