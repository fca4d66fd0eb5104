"""Rank 0's checkpoint writer: the step loop does not wait for the disk.

At a checkpoint boundary rank 0 waits for its previous write (at most one is in flight), copies the state
to host memory (`HostSnapshot`: buffers reused from one checkpoint to the next, pinned for GPU tensors)
and returns to training; a background thread writes the copy (its sha256 computed on the way), reads it
back from the storage to compare, only then names it `ckpt-<step>.pt`, and commits it
(training.checkpoint_folder: last.pt, manifest, best.pt, pruning). The other ranks never wait for it.

Whatever depends on a checkpoint being on disk - a requested stop, a Slurm requeue, the end of the run -
calls `settle` first: every rank waits there until rank 0's write has landed, and learns whether it failed.

A failed write (disk full, quota, I/O error) becomes one line naming the folder, the bytes needed and the
bytes free; the temporary file is removed and the earlier checkpoints are untouched. The ranks learn of
it at their next agreement (every few steps, `training.engine.agree_on_requests`, or at `settle`) and all
stop with the same CheckpointWriteError.

With `train.background_checkpoints: false` the write happens in the step loop, from the live state (no
host copy, so no extra memory); everything else is the same. Costs: benchmarks/RESULTS_checkpoint.md.
"""
from __future__ import annotations

import errno
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from training import dist as distmod
from training.checkpoint import CheckpointWriteError, atomic_save
from training.checkpoint_folder import checkpoint_name, commit, entry_for
from training.checkpoint_manifest import Manifest
from training.metrics import MetricsLog


class HostSnapshot:
    """Host copies of a checkpoint dict's tensors, in buffers kept from one checkpoint to the next.

    The next copy reuses a buffer only after the write that read it has finished (the writer waits for
    it first). GPU tensors land in pinned buffers, copied asynchronously and waited for once.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, state: Any) -> Any:
        """`state` with every tensor replaced by a host copy and every container rebuilt (scalars shared)."""
        copied = self._copy(state, ())
        if any(b.is_pinned() for b in self._buffers.values()) and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
        return copied

    def _copy(self, obj: Any, key: tuple) -> Any:
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[key] = buf
            return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self._copy(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, (*key, i)) for i, v in enumerate(obj))
        return obj


def tensor_bytes(state: Any) -> int:
    """The bytes of every tensor in a checkpoint dict: what its file needs, give or take a few kilobytes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


@dataclass
class _Write:
    """One checkpoint write: what it is, and how it went (filled in by whoever runs it)."""

    step: int
    epoch: int
    best: bool
    val_top1: float | None
    needed: int
    stall_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    error: str | None = None


class CheckpointWriter:
    """Writes rank 0's checkpoints into a checkpoints folder; on the other ranks every method does nothing.

    Args:
        folder: the run's checkpoints folder.
        keep: how many of the newest checkpoints to keep (`train.keep_checkpoints`).
        background: write in a thread from a host copy (`train.background_checkpoints`).
        every_min: minutes between timed checkpoints by this rank's clock (`train.checkpoint_every_min`).
        enabled: this is rank 0.
        log: where each landed checkpoint is recorded (`{"event": "checkpoint", "step", "write_s", "stall_s",
            "bytes"}`).
    """

    def __init__(self, folder: Path, keep: int, background: bool, every_min: float | None, enabled: bool,
                 log: MetricsLog | None = None) -> None:
        self.folder, self.keep, self.background, self.every_min = Path(folder), keep, background, every_min
        self.enabled, self.log = enabled, log
        self.manifest = Manifest()  # the one on disk once the last write has landed
        self.error: str | None = None  # the first failed write's line
        self._snapshot = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._inflight: _Write | None = None
        self._last = time.monotonic()

    def start(self, manifest: Manifest) -> None:
        """Continue `manifest` (training.checkpoint_folder.continued_manifest); the timed cadence starts now."""
        self.manifest = manifest
        self._last = time.monotonic()

    def submit(self, state: Callable[[], dict[str, Any]], step: int, epoch: int, best: bool = False,
               val_top1: float | None = None) -> Path:
        """Write the checkpoint of `step` (rank 0); returns the file it will be.

        Waits for the previous write first. After a failed write nothing more is written: the ranks are
        about to stop at their next agreement.

        Args:
            state: makes the checkpoint dict (called on rank 0 only, at this boundary).
            step, epoch: the run's counters.
            best: it is the best epoch-end checkpoint so far (best.pt will name it).
            val_top1: the validation that made it the best.
        """
        path = self.folder / checkpoint_name(step)
        if not self.enabled:
            return path
        began = time.perf_counter()
        self.wait()
        if self.error:
            return path
        self._last = time.monotonic()
        live = state()
        job = _Write(step, epoch, best, val_top1, tensor_bytes(live))
        if self.background:
            copy = self._snapshot.copy(live)
            self._inflight = job
            self._thread = threading.Thread(target=self._write, args=(copy, job), name=f"checkpoint-{step}")
            self._thread.start()
            job.stall_s = time.perf_counter() - began
        else:
            self._write(live, job)
            job.stall_s = time.perf_counter() - began
            self._landed(job)
        return path

    def _write(self, state: dict[str, Any], job: _Write) -> None:
        """Write, read back, commit (in the background thread, or inline); the outcome goes into `job`."""
        name = checkpoint_name(job.step)
        path = self.folder / name
        began = time.perf_counter()
        try:
            digest = atomic_save(state, path, read_back=True)
            entry = entry_for(name, job.step, job.epoch, digest, job.val_top1 if job.best else None)
            self.manifest = commit(self.folder, self.manifest, entry, self.keep, job.best)
            job.bytes = digest.bytes
        except Exception as e:  # noqa: BLE001 - every failure becomes the run's one line
            job.error = self._describe(e, job)
        job.write_s = time.perf_counter() - began

    def _describe(self, e: Exception, job: _Write) -> str:
        newest = self.manifest.checkpoints[0].file if self.manifest.checkpoints else None
        kept = f"the earlier checkpoints are untouched (newest: {newest})" if newest else "no earlier checkpoint exists"
        if isinstance(e, CheckpointWriteError):
            return str(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{_size(shutil.disk_usage(self.folder).free)} free"
            except OSError:
                free = "free space unknown"
            what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
            return (f"{self.folder}: {what} writing the checkpoint of step {job.step}: it needs about "
                    f"{_size(job.needed)}, {free}; the temporary file is removed and {kept}; free space (or "
                    f"raise the quota) and resume with --resume auto")
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return f"{self.folder}: cannot write the checkpoint of step {job.step} ({why}); {kept}"

    def _landed(self, job: _Write) -> None:
        """Record a finished write: its metrics row, or its failure."""
        if job.error:
            self.error = self.error or job.error
        elif self.log is not None:
            self.log.write({"event": "checkpoint", "step": job.step, "write_s": round(job.write_s, 4),
                            "stall_s": round(job.stall_s, 4), "bytes": job.bytes})

    def poll(self) -> None:
        """Collect the write in flight if it has finished (never waits)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Wait until the write in flight, if any, has landed or failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread, job, self._inflight = None, self._inflight, None
            if job is not None:
                self._landed(job)

    def failed(self) -> bool:
        """A write of rank 0 has failed (known without waiting for the one in flight)."""
        self.poll()
        return self.error is not None

    def time_due(self) -> bool:
        """Rank 0's clock says a timed checkpoint is due (`train.checkpoint_every_min`)."""
        return (self.enabled and self.every_min is not None
                and time.monotonic() - self._last >= 60 * self.every_min)

    def raise_failure(self) -> None:
        """Stop this rank: rank 0 with the failed write's line, the others saying where to look."""
        raise CheckpointWriteError(self.error or "rank 0 could not write a checkpoint; its log says why")

    def close(self) -> None:
        """Let the write in flight land (a crash or a stop must not tear a checkpoint it could finish)."""
        self.wait()


def settle(writer: CheckpointWriter, group: Any) -> None:
    """Every rank: wait until rank 0's checkpoint has landed; all raise CheckpointWriteError if a write failed.

    A collective: every rank calls it at the same point (before a requeue, a stop or the final summary).
    """
    writer.wait()
    failed = torch.tensor([int(writer.failed())], dtype=torch.int32)
    distmod.all_reduce(failed, "max", group)
    if int(failed):
        writer.raise_failure()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
