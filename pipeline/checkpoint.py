"""Checkpoints that are either complete or never loaded.

A checkpoint is written into a hidden temporary dir, sealed with a manifest of SHA-256 checksums, then renamed to
`step-NNNNNN` (a rename within one filesystem is atomic). The previous complete checkpoint is deleted only after
the new one is in place. Loading picks the newest checkpoint whose manifest verifies, so one cut off mid-write
(no manifest, a missing file or a wrong checksum) is skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STATE = "state.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def save(root: Path, step: int, state: dict[str, Any], write: Callable[[Path], None] | None = None, *, keep: int = 2):
    """Write `state` (JSON) and whatever `write(dir)` puts in dir as checkpoint `step`; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if write is not None:
        write(tmp)
    (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=1))
    manifest = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():  # a re-run of the same step after a resume: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> bool:
    """True when `path` has a manifest and every file in it exists with the recorded checksum (and no others)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    present = {str(p.relative_to(path)) for p in _files(path)}
    if present != set(manifest):
        return False
    return all(_sha256(path / rel) == digest for rel, digest in manifest.items())


def complete(root: Path) -> list[Path]:
    """Sealed checkpoint dirs under `root`, oldest first (not verified: see `latest`)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())


def latest(root: Path) -> Path | None:
    """The newest checkpoint under `root` that verifies, or None."""
    for path in reversed(complete(root)):
        if verify(path):
            return path
    return None


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())
