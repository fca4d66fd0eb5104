"""Checkpoints: one dict of state_dicts, written atomically by rank 0, loadable with `weights_only=True`.

`OUT/checkpoints/last.pt` is rewritten every `train.checkpoint_every` steps and at each epoch end;
`best.pt` is a copy of the epoch-end state with the best val top-1 so far. A kill at any instant
leaves the previous file whole: bytes go to a temporary file, are fsynced, and only then renamed over
the old name (rename within one filesystem is atomic), and the folder is fsynced so the rename
itself survives a crash.

Nothing in a checkpoint is pickled code: tensors, numbers, strings, lists and dicts only, so
`torch.load(path, weights_only=True)` reads it without trusting the file.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.run_folder import LAST

FORMAT_VERSION = 1
# What every checkpoint holds (a model a predict can rebuild), and what a training checkpoint adds (a
# run a resume can continue). `senet import-weights` writes model checkpoints (kind "weights").
MODEL_KEYS = ("format_version", "model", "classes", "arch", "num_classes", "config")
TRAINING_KEYS = MODEL_KEYS + ("optimizer", "scaler", "scheduler", "epoch", "step", "loader")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers (whose state_dict keys carry prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path` so that a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    tmp.replace(path)
    _fsync_dir(path.parent)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a finished checkpoint (last.pt -> best.pt) with the same guarantee as `atomic_save`."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    tmp.replace(dst)
    _fsync_dir(dst.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, mmap: bool = False, training: bool = True) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without unpickling code, checking its format.

    Args:
        path: the checkpoint file.
        mmap: map the tensors instead of reading them (`peek_checkpoint`: cheap on a login node).
        training: require a training checkpoint (to resume); False accepts any model checkpoint,
            imported weights included (to predict, or to start a run from).

    Raises:
        CheckpointError: missing file, unreadable file, another format version or missing entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this code reads format {FORMAT_VERSION}")
    if training and state.get("kind") == "weights":
        raise CheckpointError(f"{path}: holds imported weights, not a run to resume; start a run from them with "
                              f"--set train.init_from={path}, or score them with `senet predict`")
    missing = [k for k in (TRAINING_KEYS if training else MODEL_KEYS) if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def parameters_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes, in name order: equal digests, equal bits."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's counters and config, checked like `load_checkpoint`, its tensors only memory-mapped."""
    return load_checkpoint(path, mmap=True)


def resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from: `auto` = last.pt when it exists, a path = that file, None = fresh.

    Raises:
        CheckpointError: an explicit path that does not exist.
    """
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        last = checkpoint_dir / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path
