"""A run's checkpoints folder: the newest `train.keep_checkpoints` checkpoints, verified, and two names.

    checkpoints/ckpt-00001200.pt               one file per checkpoint, named by its step
    checkpoints/manifest.json                  size and sha256 of each kept file (training.checkpoint_manifest)
    checkpoints/last.pt -> ckpt-00001200.pt    the newest checkpoint, verified after it was written
    checkpoints/best.pt -> ckpt-00001000.pt    the epoch-end checkpoint with the best val top-1 (kept too)

`commit` adds a written and read-back checkpoint in an order that leaves a usable folder after a crash
between any two of its steps: last.pt, then the manifest, then best.pt, then pruning. Pruning removes only
checkpoints that the manifest on disk no longer lists (and temporary files of killed writers).

`newest_usable` finds what a resume continues from: the newest checkpoint that verifies, among those the
manifest lists, files it does not list (written just before a crash, or a torn manifest: checked by their
zip CRCs), and a version 1 run folder's last.pt (a plain file). Candidates that fail are named in one
line; when every candidate fails it raises ResumeError: a run never starts afresh over checkpoints it
could not read.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from training.checkpoint import CheckpointError, ResumeError, peek_checkpoint, verify
from training.checkpoint_manifest import Entry, Manifest, read_manifest, write_manifest
from training.durable import FileDigest, fsync_dir, is_temporary, point_name
from training.run_folder import BEST, LAST

CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.pt")
T = TypeVar("T")


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint taken after `step` optimizer steps."""
    return f"ckpt-{step:08d}.pt"


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a resume could continue from."""

    path: Path
    step: int
    entry: Entry | None  # what the manifest records; None: verified by the zip CRCs inside it
    legacy: bool = False  # a version 1 run folder's last.pt (a plain file, no manifest)


@dataclass(frozen=True)
class Found:
    """The newest usable checkpoint, what was learned on the way to it, and whatever `use` returned."""

    candidate: Candidate
    value: object
    skipped: tuple[str, ...]  # "ckpt-00001200.pt (why)", newest first
    manifest: Manifest | None  # the folder's manifest as read (None: absent or unreadable)
    manifest_problem: str | None

    @property
    def note(self) -> str | None:
        """One line for the log when anything was wrong on the way: which files, and where the run continues."""
        if not self.skipped and not self.manifest_problem:
            return None
        parts = []
        if self.skipped:
            verb = "is" if len(self.skipped) == 1 else "are"
            parts.append(f"{', '.join(self.skipped)} {verb} unusable")
        if self.manifest_problem:
            parts.append(f"{self.manifest_problem}, so each file was checked by its own CRC-32s")
        return (f"{self.candidate.path.parent}: {'; '.join(parts)}; continuing from step {self.candidate.step} "
                f"({self.candidate.path.name})")


def candidates(folder: Path) -> tuple[list[Candidate], Manifest | None, str | None]:
    """What a resume could continue from, newest first; the manifest and why it was not trusted, if it was not."""
    manifest, problem = read_manifest(folder)
    found: dict[int, Candidate] = {}
    if manifest:
        for e in manifest.checkpoints:
            found[e.step] = Candidate(folder / e.file, e.step, e)
    for path in folder.glob("ckpt-*.pt") if folder.is_dir() else ():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        step = int(match.group(1)) if match else -1
        listed = manifest is not None and path.name in manifest.kept
        if match and not listed and step not in found:
            found[step] = Candidate(path, step, None)
    last = folder / LAST
    if last.is_file() and not last.is_symlink() and not any(c.path.exists() and os.path.samefile(last, c.path)
                                                           for c in found.values()):
        try:
            step = int(peek_checkpoint(last)["step"])
        except (CheckpointError, KeyError, ValueError, TypeError):
            step = -1  # unreadable: tried last, and named as unusable
        found.setdefault(step, Candidate(last, step, None, legacy=True))
    return [found[s] for s in sorted(found, reverse=True)], manifest, problem


def newest_usable(folder: Path, use: Callable[[Candidate], T]) -> Found | None:
    """The newest candidate that `use` accepts, with what it returned; None when there is no candidate at all.

    Args:
        folder: a run's checkpoints folder.
        use: reads and verifies one candidate, returning what the caller needs; raises CheckpointError
            naming the problem when the candidate is unusable.

    Raises:
        ResumeError: checkpoints exist but none is usable (each named with its problem).
    """
    found, manifest, problem = candidates(folder)
    skipped: list[str] = []
    for c in found:
        try:
            value = use(c)
        except CheckpointError as e:
            skipped.append(f"{c.path.name} ({str(e).removeprefix(f'{c.path}: ')})")
            continue
        except OSError as e:
            skipped.append(f"{c.path.name} ({e.strerror or e})")
            continue
        return Found(c, value, tuple(skipped), manifest, problem)
    if not found:
        return None
    why = f"; {problem}" if problem else ""
    raise ResumeError(f"{folder}: no checkpoint verifies: {'; '.join(skipped)}{why}. Nothing was resumed; put back "
                      f"a good copy, or start afresh with --resume none (that abandons the run's progress)")


def verify_candidate(c: Candidate) -> None:
    """Verify a candidate from its file (streamed, nothing kept in memory); CheckpointError when it fails."""
    with open(c.path, "rb") as f:
        problem = verify(f, c.entry)
    if problem:
        raise CheckpointError(f"{c.path}: {problem}")


# ------------------------------------------------------------------------------------------ writing
def commit(folder: Path, manifest: Manifest, written: Entry, keep: int, best: bool) -> Manifest:
    """Add a written and verified checkpoint: last.pt, the manifest, best.pt (when `best`), then pruning.

    Args:
        folder: the checkpoints folder.
        manifest: the manifest the run continues (older checkpoints of this run; the best one).
        written: the new checkpoint's entry.
        keep: how many of the newest checkpoints to keep (the best one is kept besides).
        best: the new checkpoint is the best so far.

    Returns:
        The new manifest (on disk when this returns).
    """
    point_name(folder / LAST, written.file)
    older = [e for e in manifest.checkpoints if e.step < written.step]  # later ones: a timeline the run left
    new = Manifest((written, *older)[:keep], written if best else manifest.best)
    write_manifest(folder, new)  # durable with last.pt's new link: atomic_write fsyncs the folder
    if best:
        point_name(folder / BEST, written.file)
        fsync_dir(folder)
    prune(folder, new)
    return new


def prune(folder: Path, manifest: Manifest) -> None:
    """Remove the checkpoint files `manifest` (already on disk) does not keep, and killed writers' temporary files."""
    doomed = [p for p in folder.iterdir()
              if (CHECKPOINT_NAME.fullmatch(p.name) and p.name not in manifest.kept) or is_temporary(p.name)]
    for path in doomed:
        path.unlink(missing_ok=True)
    if doomed:
        fsync_dir(folder)


def entry_for(name: str, step: int, epoch: int, digest: FileDigest, val_top1: float | None = None) -> Entry:
    """The manifest entry of a checkpoint file with these bytes."""
    return Entry(name, step, epoch, digest.bytes, digest.sha256, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 val_top1)


def continued_manifest(folder: Path, resumed: Candidate | None, digest: FileDigest | None, epoch: int) -> Manifest:
    """The manifest a run continues: its checkpoints up to the one it resumed from, and the best one.

    A fresh run keeps only the best entry (best.pt stays until its first validation replaces it) and
    its first commit prunes the earlier run's checkpoints. A candidate the manifest does not list
    (resumed by its CRCs) is recorded with `digest`, the sha256 of the bytes the resume read; a version 1
    run folder's last.pt becomes ckpt-<step>.pt (last.pt naming it), so that it stays as a fallback.
    """
    manifest, _ = read_manifest(folder)
    manifest = manifest or Manifest()
    if resumed is None or resumed.path.parent.resolve() != folder.resolve():
        return Manifest((), manifest.best)
    entry = resumed.entry
    if entry is None and digest is not None:
        name = resumed.path.name
        if resumed.legacy:
            name = checkpoint_name(resumed.step)
            os.replace(resumed.path, folder / name)  # a crash before last.pt names it again: an unlisted candidate
        entry = entry_for(name, resumed.step, epoch, digest)
    kept = tuple(e for e in manifest.checkpoints if e.step < resumed.step)
    if entry is None:
        return replace(manifest, checkpoints=kept)
    new = Manifest((entry, *kept), manifest.best)
    if resumed.legacy:
        write_manifest(folder, new)
        point_name(folder / LAST, entry.file)
        fsync_dir(folder)
    return new
