"""Version store: monotonic names, atomic publication, pruning; the published record (published.json) that
readers compare in memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from backend.projects import ProjectStore
from model import atomic
from model.seg.versions import PUBLISHED, VersionNotFound, VersionStore

ROOT = Path(__file__).parents[1]


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
    store = ProjectStore(tmp_path).version_store("12.1700000000", keep=2)
    assert store.root == tmp_path / "projects" / "12" / "adclick-seg" and store.keep == 2
    assert store.latest() is None and store.published() is None and store.published_names() == []
    with pytest.raises(VersionNotFound):
        store.load()
    with pytest.raises(VersionNotFound):
        store.get("adclick-seg-v7")
    with pytest.raises(ValueError):
        ProjectStore(tmp_path).version_store("../etc")


# ---- the published record -------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(atomic, "_now", fake)
    return fake


def _commit_elsewhere(root: Path, n: int = 1) -> None:
    """Publish `n` versions from another process (as the RQ worker that trains does)."""
    code = textwrap.dedent(f"""
        from model.seg.versions import VersionStore
        store = VersionStore({str(root)!r}, keep=2)
        for _ in range({n}):
            store.commit({{"arch": "x", "config": {{}}, "state_dict": {{}}}}, {{"by": "worker"}})
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_each_publication_writes_one_record(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=2)
    for i in range(3):
        store.commit(_ckpt(i), {"i": i})
    record = json.loads((tmp_path / PUBLISHED).read_text())
    assert record["version"] == "adclick-seg-v3" and record["number"] == 3 and record["sequence"] == 3
    assert record["versions"] == ["adclick-seg-v2", "adclick-seg-v3"]  # the kept ones, pruning done
    assert abs(record["time"] - __import__("time").time()) < 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the record is a temp file + rename"
    # the sequence only grows: after every folder is removed by hand the next publication still counts on
    import shutil

    for v in store.list():
        shutil.rmtree(v.path)
    store.commit(_ckpt(9), {})
    assert store.published()["sequence"] == 4 and store.latest().name == "adclick-seg-v4"


def test_another_process_publication_is_seen_after_the_refresh(tmp_path: Path, clock: FakeClock) -> None:
    reader = VersionStore(tmp_path)
    reader.commit(_ckpt(1), {})
    assert reader.latest().name == "adclick-seg-v1"
    _commit_elsewhere(tmp_path)
    # in memory until the record is RECORD_REFRESH_S old: the click path reads nothing from disk
    assert reader.latest().name == "adclick-seg-v1"
    assert VersionStore(tmp_path).latest().name == "adclick-seg-v1", "one copy of the record per process"
    clock.now += atomic.RECORD_REFRESH_S
    info = VersionStore(tmp_path).latest()
    assert info.name == "adclick-seg-v2" and info.meta["by"] == "worker"
    assert reader.latest().name == "adclick-seg-v2"
    assert reader.published_names() == ["adclick-seg-v1", "adclick-seg-v2"]
    _commit_elsewhere(tmp_path)
    assert reader.latest(refresh=True).name == "adclick-seg-v3", "an explicit refresh reads the record at once"
    assert reader.published_names() == ["adclick-seg-v2", "adclick-seg-v3"]


def test_readers_never_list_the_version_folders(tmp_path: Path, clock: FakeClock, monkeypatch) -> None:
    store = VersionStore(tmp_path)
    store.commit(_ckpt(1), {})
    store.commit(_ckpt(2), {})

    def no_listing(self: Path):
        raise AssertionError(f"listed {self}")

    monkeypatch.setattr(Path, "iterdir", no_listing)
    monkeypatch.setattr(Path, "glob", no_listing)
    for _ in range(3):
        clock.now += 2 * atomic.RECORD_REFRESH_S  # the record is read again, the folders are not listed
        fresh = VersionStore(tmp_path)
        assert fresh.latest().name == store.latest(refresh=True).name == "adclick-seg-v2"
        assert fresh.published_names() == ["adclick-seg-v1", "adclick-seg-v2"]


def test_a_half_written_record_is_never_read(tmp_path: Path, clock: FakeClock) -> None:
    store = VersionStore(tmp_path)
    store.commit(_ckpt(1), {})
    # a writer killed in the middle of the record: its temp file stays, published.json is the old one
    code = textwrap.dedent(f"""
        import os
        from model.atomic import atomic_write
        def half(fh):
            fh.write(b'{{"version": "adclick-seg-v9", "seq')
            fh.flush()
            os._exit(9)
        atomic_write({str(tmp_path / PUBLISHED)!r}, half)
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 9
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{PUBLISHED}.")], "the killed writer's temp file"
    assert store.latest(refresh=True).name == "adclick-seg-v1"
    # a record damaged by hand: the last good one stays (logged), nothing raises on the click path
    (tmp_path / PUBLISHED).write_text('{"version": "adclick-seg-v9", "seq')
    clock.now += atomic.RECORD_REFRESH_S
    assert store.latest().name == "adclick-seg-v1"
    assert store.commit(_ckpt(2), {}).name == "adclick-seg-v2"
    assert store.latest(refresh=True).name == "adclick-seg-v2" and store.published()["sequence"] == 2


def test_a_store_written_before_records_is_adopted_once(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=3)
    store.commit(_ckpt(1), {})
    store.commit(_ckpt(2), {})
    (tmp_path / PUBLISHED).unlink()  # as an older release left it
    fresh = VersionStore(tmp_path)
    assert fresh.published(refresh=True) is None
    assert fresh.latest().name == "adclick-seg-v2"
    record = json.loads((tmp_path / PUBLISHED).read_text())
    assert record["version"] == "adclick-seg-v2" and record["sequence"] == 2
    assert fresh.published_names() == ["adclick-seg-v1", "adclick-seg-v2"]
    assert fresh.commit(_ckpt(3), {}).name == "adclick-seg-v3" and fresh.published()["sequence"] == 3


def test_a_record_naming_a_removed_version_serves_none(tmp_path: Path) -> None:
    import shutil

    store = VersionStore(tmp_path)
    info = store.commit(_ckpt(1), {})
    shutil.rmtree(info.path)
    assert VersionStore(tmp_path).latest(refresh=True) is None
    with pytest.raises(VersionNotFound):
        VersionStore(tmp_path).load()
    assert os.path.exists(tmp_path / PUBLISHED)
