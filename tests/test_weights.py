"""Weights manifest (sha256 + config checks, clear errors) and `python -m weights fetch` over local HTTP."""
from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

import weights
from model.checkpoint import atomic_save, make_checkpoint
from model.modeling.adclick import ARCH, AdClickConfig, AdClickNet
from weights import WeightsError, fetch, verify_entry, write_entry

SHIPPED = Path(weights.__file__).resolve().parent


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_verifies_sha256(server, tmp_path, monkeypatch):
    root, base = server
    payload = b"fake open_clip checkpoint" * 1000
    (root / "good.pt").write_bytes(payload)
    (root / "bad.pt").write_bytes(payload + b"tampered")
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(weights.OPEN_CLIP_CHECKPOINTS, "Test/model", (f"{base}/good.pt", sha, "test.pt"))
    dest = tmp_path / "ckpt"
    path = fetch("Test/model", dest)
    assert path.read_bytes() == payload
    path.unlink()
    with pytest.raises(WeightsError, match="sha256"):
        fetch("Test/model", dest, url=f"{base}/bad.pt")
    assert not any(dest.iterdir())  # nothing half-written is left behind
    with pytest.raises(WeightsError, match="cannot download"):
        fetch("Test/model", dest, url=f"{base}/missing.pt")
    with pytest.raises(WeightsError, match="unknown checkpoint"):
        fetch("nope", dest)


def test_fetch_cli_lists_and_fails_cleanly(capsys):
    from weights.__main__ import main

    assert main(["list"]) == 0
    assert "ViT-B-32/openai" in capsys.readouterr().out


def _tiny_weights(wdir: Path) -> None:
    cfg = AdClickConfig(res_channels=4, text_dim=8, dim=16, block_dim=16, depth=2, heads=2, window=4,
                        head_dim=16, stem_channels=8)
    atomic_save(make_checkpoint(ARCH, cfg.to_dict(), AdClickNet(cfg).state_dict(), {}), wdir / "adclick.pt")
    write_entry(wdir, "adclick", {"file": "adclick.pt", "engine": {"backbone": {"name": "efficientnet_lite0"},
                                                                   "residual": {"pca_dim": 0}}})


def test_manifest_detects_corruption(tmp_path):
    _tiny_weights(tmp_path)
    assert verify_entry(tmp_path, "adclick")["file"] == "adclick.pt"
    with open(tmp_path / "adclick.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(WeightsError, match="corrupt"):
        verify_entry(tmp_path, "adclick")
    with pytest.raises(WeightsError, match="no entry"):
        verify_entry(tmp_path, "other")
    with pytest.raises(WeightsError, match="no weights manifest"):
        verify_entry(tmp_path / "empty", "adclick")


def test_choice_checks_engine_compatibility(tmp_path):
    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualConfig, ResidualEngine
    from model.interactive.choose import InteractiveConfig
    from model.interactive.learned import check_weights, load_interactive_predictor

    _tiny_weights(tmp_path)
    ok = ResidualEngine(BackboneConfig(device="cpu"), ResidualConfig())
    entry, reason = check_weights(ok, tmp_path)
    assert entry is not None and "sha256" in reason
    choice = load_interactive_predictor(ok, InteractiveConfig(use_prompt=True, learned_weight=1.0, weights_dir=tmp_path))
    assert choice is not None and choice.version == f"adclick-{entry['sha256'][:8]}"
    served = load_interactive_predictor(ok, InteractiveConfig(weights_dir=tmp_path))  # the served defaults
    assert served is not None and served.version == f"adclick-{entry['sha256'][:8]}-noprompt-blend0.5"
    other = ResidualEngine(BackboneConfig(name="open_clip", device="cpu"), ResidualConfig())
    entry, reason = check_weights(other, tmp_path)
    assert entry is None and "backbone name" in reason
    assert load_interactive_predictor(other, InteractiveConfig(weights_dir=tmp_path)) is None
    assert load_interactive_predictor(ok, InteractiveConfig(weights_dir=tmp_path / "missing")) is None


def test_shipped_weights_verify_when_present():
    if not (SHIPPED / "manifest.json").is_file():
        pytest.skip("no weights shipped yet")
    entry = verify_entry(SHIPPED, "adclick")
    assert entry["licence"] and entry["training"] and "seed" in entry
    ckpt = torch.load(SHIPPED / entry["file"], map_location="cpu", weights_only=True)
    assert ckpt["arch"] == ARCH
    assert (SHIPPED / entry["file"]).stat().st_size <= 25 * 2**20
