"""Session fixtures of the end-to-end test: synthetic images under a local-files document root, a real Label
Studio 1.23.2 (its own cached virtual environment, created on the first run), the backend under gunicorn, and
one project wired to it. Both servers are stopped after the session, also when a test or a fixture fails."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e import processes
from tests.e2e.ls_api import LABEL_CONFIG, LabelStudioAPI
from tests.fixtures.images import Dataset, write_dataset

# The model's extra params in Label Studio (per project, sent with /setup): a short ADClick-Seg fit keeps the
# test within minutes on a CPU; the tiny synthetic defect is learned well before 300 steps.
EXTRA_PARAMS = {"seg_fit_steps": 80}


@dataclass(frozen=True)
class LabelStudio:
    url: str
    token: str
    api: LabelStudioAPI


@dataclass(frozen=True)
class Backend:
    url: str
    log: Path

    def get(self, path: str, **params) -> dict:
        resp = requests.get(self.url + path, params=params, timeout=10)
        assert resp.status_code == 200, f"GET {path} -> {resp.status_code}: {resp.text[:500]}"
        return resp.json()


@dataclass(frozen=True)
class Project:
    id: int
    ml: int  # the ML backend connection's id in Label Studio
    tasks: dict[str, dict]  # image file name -> task
    cold_setup_s: float  # how long the backend's first /setup took


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def dataset(e2e_root) -> Dataset:
    """normals/ (the backend's references) and tasks/ (imported into Label Studio) under the document root."""
    return write_dataset(e2e_root / "files")


@pytest.fixture(scope="session")
def label_studio(e2e_root, dataset) -> LabelStudio:
    venv = processes.ensure_ls_venv(processes.default_ls_venv())
    server, token = processes.start_label_studio_from_template(venv, e2e_root / "ls-data", e2e_root / "files",
                                                               e2e_root / "label-studio.log")
    try:
        yield LabelStudio(server.url, token, LabelStudioAPI(server.url, token))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def backend(e2e_root, dataset, label_studio) -> Backend:
    log = e2e_root / "backend.log"
    server = processes.start_backend({
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(e2e_root / "models"),
        "ADCLICK_NORMAL_DIR": str(dataset.normal_dir),
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "2",
        "ADCLICK_ADAPT_MINUTES": "0.5",  # the interactive network's adaptations: 30 s each, not 8 min
    }, log)
    try:
        yield Backend(server.url, log)
    finally:
        server.stop()
        print(f"\n--- backend log (tail) ---\n{processes.log_tail(log, 30)}")


@pytest.fixture(scope="session")
def project(label_studio, backend, dataset) -> Project:
    api = label_studio.api
    pid = api.create_project("ADClick e2e")
    names = dataset.defective + dataset.normal
    tasks = api.import_local_files(pid, str(dataset.task_dir), expected=len(names))
    by_name = {}
    for task in tasks:
        ref = task["data"]["image"]  # /data/local-files/?d=tasks/<name>
        by_name[ref.rsplit("/", 1)[-1]] = task
    assert sorted(by_name) == sorted(names), f"imported tasks {sorted(by_name)} != images {sorted(names)}"
    # The first /setup of a fresh process, timed as Label Studio would (it waits 3 s): test_backend_is_connected
    # asserts on the figure; the connection below then finds the backend warm, so the rest of the flow is
    # checked even while a cold /setup is too slow.
    t0 = time.monotonic()
    cold = requests.post(backend.url + "/setup", json={"project": f"{pid}.{int(time.time())}",
                                                       "schema": LABEL_CONFIG}, timeout=300)
    cold_setup_s = time.monotonic() - t0
    assert cold.status_code == 200, f"/setup -> {cold.status_code}: {cold.text[:500]}"
    ml = api.connect_backend(pid, backend.url, extra_params=EXTRA_PARAMS)
    # /setup builds the project's reference bank in the background (about a minute on a busy 2-core machine); a
    # click before it is ready waits BANK_WAIT_S and then gets a 503 that says so. Wait like an annotator would.
    end = time.monotonic() + 300
    while str(pid) not in backend.get("/health")["reference_images"]["projects"]:
        assert time.monotonic() < end, f"no reference bank for project {pid} after 300 s:\n" + \
            processes.log_tail(backend.log, 30)
        time.sleep(1.0)
    return Project(pid, ml["id"], by_name, cold_setup_s)
