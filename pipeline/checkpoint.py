"""Checkpoints that are either complete or never loaded.

A checkpoint is written into a hidden temporary dir, sealed with a manifest of SHA-256 checksums, then renamed to
`step-NNNNNN` (a rename within one filesystem is atomic). The previous complete checkpoint is deleted only after
the new one is in place. Loading picks the newest checkpoint whose manifest verifies, so one cut off mid-write
(no manifest, a missing file or a wrong checksum) is skipped, never loaded; the next save removes such leftovers.
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
    for stale in root.glob(".tmp-step-*"):  # left by a writer killed mid-write; one writer per root
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    if write is not None:
        write(tmp)
    (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=1))
    manifest = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():  # a re-run of the same step after a resume: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Sealed dirs newer than this step failed verification (a resume went back past them) and their steps are
    # being run again: drop them, so they are not counted among the `keep` newest while good ones are deleted.
    for old in complete(root):
        if old.name > final.name:
            shutil.rmtree(old, ignore_errors=True)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> bool:
    """True when `path` has a manifest and every file in it exists with the recorded checksum (and no others)."""
    return problem(path) is None


def problem(path: Path) -> str | None:
    """Why checkpoint dir `path` must not be loaded, or None when its manifest verifies."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (cut off before it was sealed)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable manifest"
    if not isinstance(manifest, dict):
        return "unreadable manifest"
    present = {str(p.relative_to(path)) for p in _files(path)}
    if present != set(manifest):
        missing, extra = sorted(set(manifest) - present), sorted(present - set(manifest))
        return f"files differ from the manifest (missing: {missing}, not listed: {extra})"
    for rel, digest in manifest.items():
        if _sha256(path / rel) != digest:
            return f"{rel} does not match its checksum (truncated or changed after it was written)"
    return None


def complete(root: Path) -> list[Path]:
    """Sealed checkpoint dirs under `root`, oldest first (not verified: see `latest`)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())


def latest(root: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint under `root` that verifies, or None; `log` hears of each newer one skipped."""
    for path in reversed(complete(root)):
        reason = problem(path)
        if reason is None:
            return path
        if log is not None:
            log(f"checkpoint: skipping {path}: {reason}")
    return None


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())
