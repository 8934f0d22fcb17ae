"""Version store: monotonic names, atomic publication, pruning."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from model.seg.versions import VersionNotFound, VersionStore, project_store


def _ckpt(value: float) -> dict:
    return {"arch": "adclick-seg", "config": {}, "state_dict": {"w": torch.full((2,), value)}, "meta": {}}


def test_versions_are_monotonic_and_pruned(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=2)
    names = [store.commit(_ckpt(i), {"i": i}).name for i in range(4)]
    assert names == ["adclick-seg-v1", "adclick-seg-v2", "adclick-seg-v3", "adclick-seg-v4"]
    assert [v.name for v in store.list()] == ["adclick-seg-v3", "adclick-seg-v4"]
    ckpt, info = store.load()
    assert info.name == "adclick-seg-v4" and info.meta["i"] == 3
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((2,), 3.0))
    assert ckpt["meta"]["model_version"] == "adclick-seg-v4"
    # numbers are never reused, even when every directory is removed by hand
    for v in store.list():
        import shutil

        shutil.rmtree(v.path)
    assert store.commit(_ckpt(9), {}).name == "adclick-seg-v5"


def test_failed_write_leaves_last_good_version(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=3)
    store.commit(_ckpt(1), {"good": True})

    def boom(tmp: Path, name: str) -> None:
        (tmp / "report.png").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.commit(_ckpt(2), {}, write_extra=boom)
    assert [v.name for v in store.list()] == ["adclick-seg-v1"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert store.commit(_ckpt(3), {}).name == "adclick-seg-v2"


def test_process_killed_mid_write_leaves_last_good_version(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=3)
    store.commit(_ckpt(1), {"good": True})
    script = textwrap.dedent(
        f"""
        import os, torch
        from model.seg.versions import VersionStore
        def die(tmp, name):
            (tmp / "report.png").write_bytes(b"half")
            os._exit(9)  # no cleanup handlers: like a kill -9 in the middle of the write
        VersionStore({str(tmp_path)!r}).commit({{"arch": "x", "state_dict": {{}}}}, {{}}, write_extra=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], check=False)
    assert proc.returncode == 9
    assert list(tmp_path.glob(".tmp-*")), "the killed writer should have left its temporary directory"
    assert store.latest().name == "adclick-seg-v1" and store.latest().meta["good"] is True
    assert store.commit(_ckpt(2), {}).name == "adclick-seg-v2"
    assert not list(tmp_path.glob(".tmp-*"))


def test_concurrent_commits_get_distinct_numbers(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=10)
    names: list[str] = []
    threads = [threading.Thread(target=lambda: names.append(store.commit(_ckpt(0), {}).name)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names, key=lambda n: int(n.rsplit("v", 1)[1])) == [f"adclick-seg-v{i}" for i in range(1, 7)]


def test_lookup_errors_and_project_ids(tmp_path: Path) -> None:
    store = project_store(tmp_path, "12.1700000000", keep=2)
    assert store.root == tmp_path / "projects" / "12" / "adclick-seg"
    assert store.latest() is None
    with pytest.raises(VersionNotFound):
        store.load()
    with pytest.raises(VersionNotFound):
        store.get("adclick-seg-v7")
    with pytest.raises(ValueError):
        project_store(tmp_path, "../etc")
