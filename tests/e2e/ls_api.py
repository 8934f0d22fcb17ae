"""The few Label Studio REST calls the end-to-end test makes, with the legacy `Token` header. Every call
checks its HTTP status and shows the answer's body when it is not the expected one."""
from __future__ import annotations

import time
from typing import Any, Optional

import requests

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
    def connect_backend(self, project: int, url: str, title: str = "ADClick") -> dict:
        return self.call("POST", "/api/ml", json={"project": project, "url": url, "title": title,
                                                  "is_interactive": True, "auth_method": "NONE"})

    def interactive(self, ml: int, task: int, context: dict) -> dict:
        return self.call("POST", f"/api/ml/{ml}/interactive-annotating", json={"task": task, "context": context})

    def train(self, ml: int) -> Any:
        return self.call("POST", f"/api/ml/{ml}/train", json={})

    def versions(self, ml: int) -> dict:
        return self.call("GET", f"/api/ml/{ml}/versions")

    def retrieve_predictions(self, project: int) -> Any:
        return self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                           "project": project},
                         json={"selectedItems": {"all": True, "excluded": []}})

    def predictions(self, task: int, model_version: Optional[str] = None) -> list[dict]:
        items = self.call("GET", "/api/predictions", params={"task": task})
        return [p for p in items if model_version is None or p.get("model_version") == model_version]
