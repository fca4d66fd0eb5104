"""Checkpoint files: format version 2 (version 1 still read), written atomically, verified before use.

A checkpoint is one dict of state_dicts, counters, the class list and the resolved config. Nothing in it
is pickled code (tensors, numbers, strings, lists, dicts), so `torch.load(path, weights_only=True)` reads
it without trusting the file.

Format versions:
    1  a training checkpoint (`TRAINING_KEYS` less `kind`) or imported weights (`kind` "weights").
    2  every file says its `kind` ("training" or "weights"), and a run's checkpoints folder records each
       file's size and sha256 in a manifest (training.checkpoint_folder). Keys of `OPTIONAL_KEYS` may be
       absent (a reader gets their default) and readers ignore keys they do not know: a later addition
       (an elastic run's counters, EMA weights) is an optional key with a default, not a new version.
Version 1 files are read as version 2 (`upgrade`), for a resume and for `senet predict` alike.

Verification (`verify`): against the size and sha256 that the folder's manifest records for the file,
or, for a file it does not list (a copied file, a torn manifest, a version 1 run folder), against the
CRC-32 that the zip container stores for each record: every tensor's bytes and the pickled structure.
torch.load checks neither: a file with flipped bits in its tensor data loads without complaint.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from training.checkpoint_manifest import MANIFEST, Entry, recorded_entry
from training.durable import CHUNK, FileDigest, atomic_write, file_digest

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What every checkpoint holds (a model a predict can rebuild), and what a training checkpoint adds (a
# run a resume can continue). `senet import-weights` writes model checkpoints (kind "weights").
MODEL_KEYS = ("format_version", "kind", "model", "classes", "arch", "num_classes", "config")
TRAINING_KEYS = MODEL_KEYS + ("optimizer", "scaler", "scheduler", "epoch", "step", "loader")
# Keys a reader must not require, with the value an older file means by leaving them out.
# "ema": the weight EMA (training.ema.WeightEMA.state_dict), None without one; "best_weights": whose top-1
# best_top1 is, "raw" or "ema"; "virtual_ranks" and "global_batch": what the run fixed when it started
# (training.virtual), None in a file older than them, whose run started with its world_size (added in version 2
# without a new version number, as it says above).
OPTIONAL_KEYS: dict[str, Any] = {"mid_epoch": False, "world_size": None, "best_top1": -1.0, "last_val": {},
                                 "best_weights": "raw", "ema": None, "virtual_ranks": None, "global_batch": None}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class ResumeError(CheckpointError):
    """Nothing to resume from although there should be: no checkpoint verifies, or the one named is unusable
    (a usage error, exit 2: a run never starts afresh silently over checkpoints it could not read)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, I/O error); the earlier ones are untouched."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers (whose state_dict keys carry prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def atomic_save(obj: Any, path: Path, read_back: bool = False) -> FileDigest:
    """torch.save to `path` so that a reader sees the old file or the new one, never a torn one.

    Args:
        obj: what to save.
        path: the file.
        read_back: before the file takes its name, read it back from the storage and compare its sha256
            with that of the bytes written (a name then only ever points at bytes known to be stored).

    Returns:
        The size and sha256 of the bytes written.

    Raises:
        OSError: the file system's error; CheckpointWriteError: the bytes read back differ (the temporary
            file is removed either way, and `path` is untouched).
    """
    path = Path(path)

    def compare(written: Path, digest: FileDigest) -> None:
        back = file_digest(written, from_storage=True)
        if back != digest:
            raise CheckpointWriteError(f"{path}: read back {back.bytes} bytes with another sha256 than the "
                                       f"{digest.bytes} written; the storage does not keep what it is given")

    with atomic_write(path, compare if read_back else None) as f:
        torch.save(obj, f)
    return f.digest


# ------------------------------------------------------------------------------------------ reading
class MemoryFile(io.RawIOBase):
    """A read-only, seekable file over bytes in memory: torch.load and zipfile read it without a copy."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_bytes(path: Path) -> bytearray:
    """A file's bytes in one buffer (writable: a broadcast can send it as it is)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data):
            n = f.readinto(view[got:got + CHUNK])
            if not n:
                del data[got:]  # shrank while being read
                break
            got += n
    return data


def verify(f: BinaryIO, expected: Entry | None) -> str | None:
    """What is wrong with a checkpoint's bytes, or None when they are the bytes that were written.

    Args:
        f: the checkpoint, open for reading (a file or a `MemoryFile`); read to the end.
        expected: what the manifest records for it; None checks the CRC-32s inside the zip container.
    """
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if expected is not None:
        if size != expected.bytes:
            how = "truncated" if size < expected.bytes else "longer than written"
            return f"{how}: {size} bytes, {MANIFEST} records {expected.bytes}"
        sha = hashlib.sha256()
        while chunk := f.read(CHUNK):
            sha.update(chunk)
        if sha.hexdigest() != expected.sha256:
            return f"sha256 differs from the one {MANIFEST} records: its bytes changed after it was written"
        return None
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a whole checkpoint file ({str(e) or type(e).__name__})"
    if bad is not None:
        return f"the CRC-32 of its record {bad} fails: its bytes changed after it was written"
    return None


def state_from_bytes(data: bytes | bytearray | memoryview, name: str | Path, training: bool = True) -> dict[str, Any]:
    """The checkpoint dict held in `data`, upgraded to version 2 and checked (`load_checkpoint`'s rules)."""
    return check_state(_torch_load(MemoryFile(data), name), name, training)


def _torch_load(source: Any, name: str | Path, mmap: bool = False) -> Any:
    """torch.load onto the CPU without unpickling code; CheckpointError for anything it cannot read."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a foreign file
        raise CheckpointError(f"{name}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def check_state(state: Any, name: str | Path, training: bool = True) -> dict[str, Any]:
    """`state` as version 2, or CheckpointError naming what it lacks.

    Args:
        state: what torch.load returned.
        name: the file, for messages.
        training: require a training checkpoint (to resume); False accepts any model checkpoint.
    """
    found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
    if found not in READABLE_VERSIONS:
        raise CheckpointError(f"{name}: checkpoint format {found!r}; this code reads formats "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    state = upgrade(state)
    if training and state.get("kind") == "weights":
        raise CheckpointError(f"{name}: holds imported weights, not a run to resume; start a run from them with "
                              f"--set train.init_from={name}, or score them with `senet predict`")
    missing = [k for k in (TRAINING_KEYS if training else MODEL_KEYS) if k not in state]
    if missing:
        raise CheckpointError(f"{name}: checkpoint lacks {', '.join(missing)}")
    return state


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict as the current version reads it: version 1 gains `kind`; absent optional keys their default."""
    state = dict(state)
    if state["format_version"] == 1:
        state.setdefault("kind", "training")  # version 1 marked only imported weights
        state["format_version"] = FORMAT_VERSION
    for key, default in OPTIONAL_KEYS.items():
        if key not in state:
            state[key] = copy.deepcopy(default)
    return state


def load_checkpoint(path: str | Path, training: bool = True) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, verified (`verify`) and checked, without unpickling code.

    Args:
        path: the checkpoint file (last.pt and best.pt are checked against the file they name).
        training: require a training checkpoint (to resume); False accepts any model checkpoint,
            imported weights included (to predict, or to start a run from).

    Raises:
        CheckpointError: missing, damaged or unreadable file, an unknown format version or missing entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    data = read_bytes(path)
    problem = verify(MemoryFile(data), recorded_entry(path))
    if problem:
        raise CheckpointError(f"{path}: unusable checkpoint: {problem}")
    return state_from_bytes(data, path, training)


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's counters and config with its tensors only memory-mapped: cheap, and NOT verified."""
    return check_state(_torch_load(path, path, mmap=True), path)


def parameters_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes, in name order: equal digests, equal bits."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
