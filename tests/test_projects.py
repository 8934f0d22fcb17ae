"""backend/projects.py: the one owner of project ids and of every per-project path and record under MODEL_DIR."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from backend.errors import BadRequest
from backend.projects import (
    ProjectStore,
    is_project_id,
    jobs_state_path,
    label_studio_id,
    lock_path,
    parse_project,
    project_dir,
    project_key,
)
from model import atomic
from model.atomic import write_json_atomic


@pytest.fixture()
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(atomic, "_now", lambda: now[0])
    return now


@pytest.mark.parametrize("raw", ["12", "12.1700000000", 12, 12.0, {"id": 12}, {"id": "12.5"}, " 12 "])
def test_label_studio_sends_one_project_many_ways(raw):
    assert parse_project(raw) == "12"


@pytest.mark.parametrize(
    "raw", [0, -3, "0", "-3", "default", "1e3", 1e999, math.nan, True, [], "12/..", "9" * 20, 2**63, "", None]
)
def test_anything_else_is_a_bad_request(raw):
    with pytest.raises(BadRequest):
        parse_project(raw)


def test_project_keys_inside_the_service():
    assert project_key("12.1700000000") == project_key(12) == project_key("12") == "12"
    assert project_key("default") == "default" and project_key("p_1-x") == "p_1-x"
    for bad in ("../etc", "", "a b", "12/3", "x" * 65, "12.", ".12", True, None, 1.5, b"12"):
        with pytest.raises(ValueError):
            project_key(bad)
    assert is_project_id("12") and not is_project_id("12.1") and not is_project_id("default")
    assert not is_project_id("0") and not is_project_id(str(2**63))
    assert label_studio_id("12.17") == 12
    with pytest.raises(ValueError):
        label_studio_id("default")


def test_every_per_project_path_is_spelled_here(tmp_path):
    store = ProjectStore(tmp_path, "")
    assert store.dir("7.123") == project_dir(tmp_path, 7) == tmp_path / "projects" / "7"
    assert store.references_dir("7") == tmp_path / "projects" / "7" / "references"
    assert store.versions_dir("7") == tmp_path / "projects" / "7" / "adclick-seg"
    assert store.version_store("7.99").root == store.versions_dir("7")
    assert store.version_store("7") is store.version_store(7), "serving keeps one store (and record) per project"
    trainer = store.version_store("7", keep=5)
    assert trainer.keep == 5 and trainer is not store.version_store("7") and trainer.root == store.versions_dir("7")
    assert lock_path(tmp_path, "7.5", "train") == tmp_path / "locks" / "7.train.lock"
    assert jobs_state_path(tmp_path) == tmp_path / "jobs" / "state.json"
    for bad in ("..", "../x", "a/b"):
        with pytest.raises(ValueError):
            store.dir(bad)


def test_project_settings_are_a_record_other_workers_see(tmp_path, clock):
    worker_a, worker_b = ProjectStore(tmp_path), ProjectStore(tmp_path)
    worker_a.update("3", label_config="<View/>", extra_params={"normal_dir": "/good"})
    assert worker_b.extra_params("3") == {"normal_dir": "/good"} and worker_b.label_config("3") == "<View/>"
    worker_b.update("3", label_config="<View2/>")  # a /setup without extra_params keeps them
    assert worker_a.get("3") == {"label_config": "<View2/>", "extra_params": {"normal_dir": "/good"}}
    # another process rewrites the file (as its /setup does): seen here once the record is RECORD_REFRESH_S old
    write_json_atomic(tmp_path / "projects" / "3" / "project.json", {"extra_params": {"normal_dir": "/new"}})
    assert worker_a.extra_params("3") == {"normal_dir": "/good"}
    clock[0] += atomic.RECORD_REFRESH_S
    assert worker_a.extra_params("3") == {"normal_dir": "/new"}
    assert "3" in worker_a.known() and worker_a.known() == ["3"]
    got = worker_a.get("3")
    got["extra_params"]["normal_dir"] = "/mutated"  # callers get copies: the record in memory stays intact
    assert worker_b.extra_params("3") == {"normal_dir": "/new"}


def test_references_info_is_a_record(tmp_path, clock):
    writer, reader = ProjectStore(tmp_path), ProjectStore(tmp_path)
    assert reader.references_info("5") is None
    writer.set_references_info("5", {"model_version": "r-1"})
    assert reader.references_info("5") == {"model_version": "r-1"}
    write_json_atomic(tmp_path / "projects" / "5" / "references.json", {"model_version": "r-2"})  # another process
    assert reader.references_info("5")["model_version"] == "r-1"
    clock[0] += atomic.RECORD_REFRESH_S
    assert reader.references_info("5")["model_version"] == "r-2"
    (tmp_path / "projects" / "5" / "references.json").write_text("{half")  # damaged by hand: last good one
    clock[0] += atomic.RECORD_REFRESH_S
    assert reader.references_info("5")["model_version"] == "r-2"


def test_the_service_serves_a_version_another_process_published(tmp_path, clock, monkeypatch):
    """ProjectVersions.project_version / trained_version / versions compare the published record in memory."""
    import torch

    from backend.services import build_services
    from backend.settings import Settings
    from tests.api_support import TinyEngine, tiny_chooser

    service = build_services(replace(Settings(), model_dir=tmp_path), engine_factory=lambda s: TinyEngine(),
                             predictor_chooser=tiny_chooser()).versions
    base = service.model.choice.version
    assert service.project_version("4") == base and service.trained_version("4") is None
    # the RQ worker (another ProjectStore over the same MODEL_DIR) publishes; the record is written by rename
    worker = ProjectStore(tmp_path).version_store("4", keep=2)
    monkeypatch.setattr(atomic, "_remember", lambda *a: None)  # as in another process: no shared memory
    worker.commit({"arch": "x", "config": {}, "state_dict": {"w": torch.zeros(1)}}, {})
    assert service.project_version("4") == base, "compared in memory until the record is RECORD_REFRESH_S old"
    monkeypatch.undo()
    monkeypatch.setattr(atomic, "_now", lambda: clock[0])
    clock[0] += atomic.RECORD_REFRESH_S

    def no_listing(self: Path):
        raise AssertionError(f"listed {self}")

    monkeypatch.setattr(Path, "iterdir", no_listing)
    assert service.project_version("4") == "adclick-seg-v1"
    assert service.trained_version("4").name == "adclick-seg-v1"
    assert service.versions("4") == [base, "adclick-seg-v1"]
