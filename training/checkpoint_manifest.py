"""`checkpoints/manifest.json`: what each kept checkpoint file held when it was written (size, sha256, step).

    {"manifest_version": 1,
     "checkpoints": [{"file": "ckpt-00001200.pt", "step": 1200, "epoch": 3, "bytes": 225012345,
                      "sha256": "9f2c...", "written": "2026-12-03T10:15:02Z"}, ...],   newest first
     "best": {"file": "ckpt-00001000.pt", ..., "val_top1": 0.7712} or null,
     "sha256": "<of the fields above>"}

It is written atomically (training.durable) after the checkpoint it adds, and carries a sha256 of its own
content, so a torn or altered manifest is recognised as such rather than trusted: readers then check
each file by the CRC-32s inside it (training.checkpoint.verify), and nothing is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.durable import atomic_write

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One checkpoint file as written: its name in the folder, counters, size and sha256."""

    file: str
    step: int
    epoch: int
    bytes: int
    sha256: str
    written: str  # UTC, ISO 8601
    val_top1: float | None = None  # the validation it was chosen for (the best entry)


@dataclass(frozen=True)
class Manifest:
    """The kept checkpoints, newest first, and the best one (which may be older than all of them)."""

    checkpoints: tuple[Entry, ...] = ()
    best: Entry | None = None

    @property
    def kept(self) -> frozenset[str]:
        """The files this manifest keeps: pruning removes every other checkpoint file."""
        return frozenset({e.file for e in self.checkpoints} | ({self.best.file} if self.best else set()))

    def entry(self, name: str) -> Entry | None:
        """What the manifest records for the file `name`, if anything."""
        for e in (*self.checkpoints, *((self.best,) if self.best else ())):
            if e.file == name:
                return e
        return None


def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace the folder's manifest atomically (fsynced, then renamed)."""
    body = {"manifest_version": MANIFEST_VERSION, "checkpoints": [asdict(e) for e in manifest.checkpoints],
            "best": asdict(manifest.best) if manifest.best else None}
    with atomic_write(folder / MANIFEST) as f:
        f.write((json.dumps({**body, "sha256": _body_digest(body)}, indent=1) + "\n").encode())


def read_manifest(folder: Path) -> tuple[Manifest | None, str | None]:
    """The folder's manifest, or why it cannot be trusted.

    Returns:
        (manifest, None); (None, None) when there is none (a version 1 run folder, a fresh one); (None, the
        problem) when it is torn, altered or from a newer senet.
    """
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{MANIFEST} is unreadable ({type(e).__name__})"
    if not isinstance(raw, dict) or raw.get("manifest_version") != MANIFEST_VERSION:
        found = raw.get("manifest_version") if isinstance(raw, dict) else type(raw).__name__
        return None, f"{MANIFEST} has version {found!r}, this code reads version {MANIFEST_VERSION}"
    body = {k: v for k, v in raw.items() if k != "sha256"}
    if raw.get("sha256") != _body_digest(body):
        return None, f"{MANIFEST} fails its own sha256 (torn or altered)"
    try:
        entries = tuple(Entry(**e) for e in body["checkpoints"])
        best = Entry(**body["best"]) if body.get("best") else None
    except (KeyError, TypeError) as e:
        return None, f"{MANIFEST} is malformed ({e})"
    return Manifest(entries, best), None


def recorded_entry(path: Path) -> Entry | None:
    """What the manifest of `path`'s folder records for the file `path` names (through last.pt/best.pt)."""
    path = Path(path)
    name = path.name
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent != Path(os.path.realpath(path.parent)):
            return None  # a link out of the folder: the manifest does not speak for it
        name = target.name
    manifest, _ = read_manifest(path.parent)
    return manifest.entry(name) if manifest else None
