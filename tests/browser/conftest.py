"""Fixtures of the browser test: Debian's chromium (installed with apt-get when missing and the test runs as
root), Playwright for Python driving it, a real Label Studio 1.23.2 and the backend under gunicorn (the
end-to-end tier's machinery: tests/e2e/processes.py), one project with imported images, and a logged-in
page. When a test fails, a screenshot of the page and the tails of both servers' logs are written into the
pytest tmp dir and their paths printed."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.debian import ensure_package
from tests.e2e import processes
from tests.e2e.ls_api import LabelStudioAPI
from tests.fixtures.images import Dataset, write_dataset

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1600, "height": 1000}
REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "docs" / "images"
UPDATE_SCREENSHOTS = os.environ.get("ADCLICK_UPDATE_SCREENSHOTS", "").strip() == "1"


def ensure_chromium() -> Path:
    """Debian's chromium package (Playwright's own browser download is not used)."""
    return ensure_package(CHROMIUM, "chromium")


@dataclass
class Figures:
    """What the user waits for, printed at the end and written to <tmp>/browser-figures.json (reported,
    not asserted)."""
    path: Path
    values: dict = field(default_factory=dict)

    def set(self, key: str, value) -> None:
        self.values[key] = value
        self.path.write_text(json.dumps(self.values, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Servers:
    ls_url: str
    token: str
    api: LabelStudioAPI
    backend_url: str
    ls_log: Path
    backend_log: Path
    username: str
    password: str


@pytest.fixture(scope="session")
def browser_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="session")
def browser_dataset(browser_root) -> Dataset:
    """normals/ (given to the model through the Extra params box) and tasks/: four defective images (the same
    painted defect, so every click position is known) and one normal image."""
    return write_dataset(browser_root / "files", n_defective=4, n_normal=1)


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    pytest.importorskip("playwright.sync_api",
                        reason="playwright is in the test extras: pip install -e '.[test]'")
    return ensure_chromium()


@pytest.fixture(scope="session")
def servers(browser_root, browser_dataset, chromium_path) -> Servers:
    """Label Studio (a fresh copy of the cached, migrated template) and the backend under gunicorn. The
    backend has no ADCLICK_NORMAL_DIR: the normal images reach it through the Extra params box, as README step
    5 says. Training starts only from the card's Start Training (no debounce timer during the test)."""
    venv = processes.ensure_ls_venv(processes.default_ls_venv())
    ls_log, backend_log = browser_root / "label-studio.log", browser_root / "backend.log"
    ls, token = processes.start_label_studio_from_template(venv, browser_root / "ls-data",
                                                           browser_root / "files", ls_log)
    backend = None
    try:
        backend = processes.start_backend({
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": token,
            "MODEL_DIR": str(browser_root / "models"),
            "DEVICE": "cpu",
            "OMP_NUM_THREADS": "2",
            "TRAIN_AFTER_ANNOTATIONS": "1000",
            "TRAIN_DEBOUNCE_S": "3600",
            "ADCLICK_ADAPT_MINUTES": "0.5",
        }, backend_log)
        yield Servers(ls.url, token, LabelStudioAPI(ls.url, token), backend.url, ls_log, backend_log,
                      processes.LabelStudioConfig.username, processes.LabelStudioConfig.password)
    finally:
        if backend is not None:
            backend.stop()
        ls.stop()


@pytest.fixture(scope="session")
def ui_project(servers, browser_dataset) -> dict:
    """The project (label config of the README) with the images imported from local-files storage, made
    through the API; returns {"id", "tasks": {file name: task id}}. Prelabeling is off while the test
    clicks (a click on a prelabeled region selects that region instead of adding a point; README
    troubleshooting); test_retrieve_predictions_in_the_data_manager switches it on in the UI."""
    api = servers.api
    pid = api.create_project("ADClick in the browser")
    api.call("PATCH", f"/api/projects/{pid}", json={"show_collab_predictions": False})
    names = browser_dataset.defective + browser_dataset.normal
    tasks = api.import_local_files(pid, str(browser_dataset.task_dir), expected=len(names))
    by_name = {t["data"]["image"].rsplit("/", 1)[-1]: t["id"] for t in tasks}
    assert sorted(by_name) == sorted(names), f"imported {sorted(by_name)} != {sorted(names)}"
    return {"id": pid, "tasks": by_name}


@pytest.fixture(scope="session")
def figures(browser_root) -> Figures:
    figs = Figures(browser_root / "browser-figures.json")
    yield figs
    print(f"\n--- browser figures ({figs.path}) ---\n{json.dumps(figs.values, indent=2, sort_keys=True)}")


@pytest.fixture(scope="session")
def browser_page(servers, chromium_path):
    """One Chromium page for the whole journey, logged in."""
    from playwright.sync_api import sync_playwright

    from tests.browser.ui import LabelStudioUI

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium_path), args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(30_000)
            ui = LabelStudioUI(page, servers.ls_url)
            ui.login(servers.username, servers.password)
            yield ui
        finally:
            browser.close()


def docs_screenshot(ui, name: str, **kwargs) -> None:
    """A screenshot for the README under docs/images/, only with ADCLICK_UPDATE_SCREENSHOTS=1 (CI does not
    rewrite the tree)."""
    if UPDATE_SCREENSHOTS:
        ui.page.screenshot(path=str(SCREENSHOTS / name), **kwargs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and item.get_closest_marker("browser"):
        item.stash.setdefault(_FAILED, True)


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _failure_artifacts(request, browser_root):
    """After a failed browser test: a screenshot of the page and both servers' log tails, paths printed."""
    yield
    if not request.node.stash.get(_FAILED, False) or "browser_page" not in request.fixturenames:
        return
    stem = browser_root / f"failure-{request.node.name}"
    lines = []
    try:
        ui = request.getfixturevalue("browser_page")
        ui.page.screenshot(path=f"{stem}.png", full_page=True)
        lines.append(f"screenshot: {stem}.png")
    except Exception as exc:
        lines.append(f"no screenshot ({type(exc).__name__}: {exc})")
    servers = request.getfixturevalue("servers")
    for name, log in (("label-studio", servers.ls_log), ("backend", servers.backend_log)):
        tail = Path(f"{stem}-{name}.log")
        tail.write_text(processes.log_tail(log, 200))
        lines.append(f"{name} log tail: {tail}")
    print("\n--- browser test artifacts ---\n" + "\n".join(lines))
