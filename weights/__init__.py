"""Shipped weights and their manifest (weights/manifest.json), plus named downloadable open_clip checkpoints.

manifest.json: {name: {file, sha256, arch, config, engine, text, training, seed, metrics, licence, ...}}.
`verify_entry(dir, name)` checks that the file exists and its sha256 matches the manifest, with a clear error.
`python -m weights fetch NAME [--dest DIR]` downloads one of OPEN_CLIP_CHECKPOINTS with sha256 verification.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from model.atomic import atomic_write
from model.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# name -> (url, sha256, file name). The OpenAI CLIP URLs carry the file's sha256 in their path (as open_clip's
# own pretrained table uses them); load the file with TextConfig(kind="open_clip", open_clip_model=<arch>,
# checkpoint=<path>) or BackboneConfig(name="open_clip", clip_model=<arch>, checkpoint=<path>).
OPEN_CLIP_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "ViT-B-32/openai": (
        ("https://openaipublic.azureedge.net/clip/models/"
         "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32-openai.pt"),
    "ViT-B-16/openai": (
        ("https://openaipublic.azureedge.net/clip/models/"
         "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"),
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16-openai.pt"),
    "RN50/openai": (
        ("https://openaipublic.azureedge.net/clip/models/"
         "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"),
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50-openai.pt"),
}


class WeightsError(CheckpointError):
    """Weights are missing, corrupt (sha256 mismatch) or not described by the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(wdir: Path) -> dict:
    path = Path(wdir) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"no weights manifest at {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"unreadable weights manifest {path}: {exc}") from exc


def verify_entry(wdir: Path, name: str) -> dict:
    """The manifest entry `name` after checking its file's presence and sha256."""
    entry = read_manifest(wdir).get(name)
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise WeightsError(f"weights manifest in {wdir} has no entry {name!r} with file and sha256")
    path = Path(wdir) / entry["file"]
    if not path.is_file():
        raise WeightsError(f"weights file {path} listed in the manifest is missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise WeightsError(f"weights file {path} is corrupt or replaced: sha256 {digest[:12]}..., "
                           f"manifest says {entry['sha256'][:12]}...")
    return entry


def write_entry(wdir: Path, name: str, entry: dict) -> dict:
    """Add or replace `name` in the manifest (sha256 computed here), written atomically."""
    wdir = Path(wdir)
    path = wdir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    entry = dict(entry, sha256=sha256_file(wdir / entry["file"]))
    manifest[name] = entry
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    return entry


def fetch(name: str, dest: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download checkpoint `name` into `dest` (streamed, sha256-verified, atomic); an existing verified file
    is kept. `url` overrides the table's address (mirrors, tests)."""
    import requests

    if name not in OPEN_CLIP_CHECKPOINTS:
        raise WeightsError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(OPEN_CLIP_CHECKPOINTS))}")
    table_url, sha, fname = OPEN_CLIP_CHECKPOINTS[name]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / fname
    if target.is_file() and sha256_file(target) == sha:
        logger.info("%s already present and verified", target)
        return target
    def download(fh) -> None:  # streamed into atomic_write's temp file; published only when verified
        h = hashlib.sha256()
        with requests.get(url or table_url, stream=True, timeout=timeout) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_content(1 << 20):
                fh.write(chunk)
                h.update(chunk)
        if h.hexdigest() != sha:
            raise WeightsError(f"download of {name} has sha256 {h.hexdigest()[:12]}..., "
                               f"expected {sha[:12]}...")

    try:
        atomic_write(target, download)
    except requests.RequestException as exc:
        raise WeightsError(f"cannot download {name}: {exc}") from exc
    logger.info("fetched %s -> %s", name, target)
    return target
