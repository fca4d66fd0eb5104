"""Read once per resume: rank 0 finds, reads and verifies the checkpoint; the other ranks get its bytes from rank 0.

Before, every rank read the whole file from the shared file system: a 256-rank resume of SENet-154
(about 0.9 GB with momentum) read about 230 GB. Now rank 0 reads it once (plus the manifest and, when
the newest file is damaged, the older ones it tries) and broadcasts the verified bytes over the run's
host control group (gloo: a binomial tree, so no rank sends more than log2(ranks) copies); the shared file
system sees 0.9 GB. Every rank then deserialises the same bytes.

Rank 0 alone decides (the newest checkpoint that verifies, or an error) and tells everyone, so all ranks
resume from the same file, or all stop with the same error.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from training.checkpoint import (CheckpointError, MemoryFile, ResumeError, read_bytes, state_from_bytes, verify)
from training.checkpoint_folder import Candidate, Found, newest_usable
from training.checkpoint_manifest import recorded_entry
from training.durable import FileDigest
from training.run_folder import LAST

BROADCAST_CHUNK = 256 << 20  # bytes per broadcast: bounds any one message, whatever the checkpoint's size


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from, on every rank; `note` and `digest` on rank 0 only."""

    state: dict[str, Any]
    path: Path
    candidate: Candidate | None = None  # rank 0: where it came from in the folder
    note: str | None = None  # rank 0: the one line about damaged checkpoints that were passed over
    digest: FileDigest | None = None  # rank 0: size and sha256 of the bytes read (recorded for unlisted files)


def read_resume(resume: str | None, folder: Path, group: Any, is_main: bool) -> Resumed | None:
    """The state to resume from (or None: start fresh), read from the file system by rank 0 only.

    Args:
        resume: "auto" (the newest checkpoint in `folder` that verifies, or None when there is none), a
            checkpoint path, or None / "none" (start fresh).
        folder: the run's checkpoints folder.
        group: the host (gloo) control group; None = the world group, or a single process.
        is_main: this is rank 0.

    Raises:
        ResumeError: on every rank, when checkpoints exist but none verifies, or the named one is unusable.
        CheckpointError: on every rank, when the chosen file verifies but is not a training checkpoint.
    """
    found: tuple[Resumed, bytearray] | None = None
    header: dict[str, Any] = {}
    if is_main:
        try:
            found = _find(resume, folder)
            header = {"path": str(found[0].path), "bytes": len(found[1])} if found else {"fresh": True}
        except Exception as e:  # noqa: BLE001 - told to every rank, never raised on rank 0 alone (the others would wait)
            why = str(e) if isinstance(e, CheckpointError) else f"{folder}: cannot read a checkpoint ({e})"
            header = {"error": why, "resume_error": isinstance(e, ResumeError)}
    if tdist.is_initialized():
        box = [header]
        tdist.broadcast_object_list(box, src=0, group=group)
        header = box[0]
    if "error" in header:
        raise (ResumeError if header["resume_error"] else CheckpointError)(header["error"])
    if "fresh" in header:
        return None
    data = found[1] if found else bytearray(header["bytes"])
    if tdist.is_initialized():
        flat = torch.frombuffer(data, dtype=torch.uint8)
        for begin in range(0, len(data), BROADCAST_CHUNK):
            tdist.broadcast(flat[begin:begin + BROADCAST_CHUNK], src=0, group=group)
    if found:
        return found[0]
    return Resumed(state_from_bytes(data, header["path"]), Path(header["path"]))


def _find(resume: str | None, folder: Path) -> tuple[Resumed, bytearray] | None:
    """Rank 0: the checkpoint to resume from and its bytes, read once and verified."""
    if resume is None or resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ResumeError(f"--resume {resume}: no such checkpoint file")
        try:
            legacy = path.name == LAST and not path.is_symlink()  # a version 1 run folder's last.pt
            return _load(Candidate(path, -1, recorded_entry(path), legacy))
        except CheckpointError as e:
            raise ResumeError(f"--resume {resume}: {str(e).removeprefix(f'{path}: ')}") from None
    found: Found | None = newest_usable(folder, _load)
    if found is None:
        return None
    resumed, data = found.value
    return Resumed(resumed.state, resumed.path, resumed.candidate, found.note, resumed.digest), data


def _load(c: Candidate) -> tuple[Resumed, bytearray]:
    """Read a candidate once, verify the bytes in memory and deserialise them."""
    data = read_bytes(c.path)
    problem = verify(MemoryFile(data), c.entry)
    if problem:
        raise CheckpointError(f"{c.path}: {problem}")
    state = state_from_bytes(data, c.path)
    digest = None
    if c.entry is None:  # to record it in the manifest the run continues
        digest = FileDigest(len(data), hashlib.sha256(data).hexdigest())
    return Resumed(state, c.path, replace(c, step=int(state["step"])), None, digest), data
