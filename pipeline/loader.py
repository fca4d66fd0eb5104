"""Torch iterators over the DALI graphs: TrainLoader (resumable, sharded, class-aware) and EvalLoader.

Resume is exact without DALI checkpoints: every random choice is a pure function of (seed, epoch,
global position) (pipeline.sampling, pipeline.augment), so the state is just the epoch and the global
position of the next sample. A pipeline always knows which (epoch, position) it delivers next; when
the consumer asks for another one (a resume, an epoch skipped, an epoch iterated again) it is rebuilt.

Process hygiene: Python workers are started in the constructor, so build loaders before CUDA/NCCL
is initialised (a rebuild after that uses 'spawn' instead of 'fork'). Workers ignore SIGTERM inside a
Slurm job (design.md, "Signals under Slurm": Slurm warns every task with SIGTERM before a requeue, and
the job must keep running until its checkpoint), die with their parent (PR_SET_PDEATHSIG), and are
gone after `close()`, after an exception in a `with` block, and after Ctrl-C.

Bad data: excluded files are never sampled; a file that fails the byte screen at run time is
replaced in the worker by a same-class sample chosen from (seed, epoch, position), named in the log
and counted in `stats`; a file that passes the screen but still kills the pipeline is found by
decoding the in-flight batches with PIL, remembered, and the pipeline is rebuilt at the position
of the next batch, so the replacement is the same as an uninterrupted run that knew it was bad.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import torch

from pipeline.augment import LUMA, AugmentSpec
from pipeline.dali import (EvalSource, TrainSource, decoder_options, default_threads, eval_pipeline,
                           train_pipeline)
from pipeline.datasets import ImageIndex
from pipeline.sampling import ClassAwareSampler, ShuffleSampler

log = logging.getLogger("senet.input")
STATE_FORMAT = 1
SAMPLERS = {"class_aware": ClassAwareSampler, "shuffle": ShuffleSampler}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_REBUILDS = 8  # pipeline deaths tolerated per epoch before the error is raised
WORKER_EXIT_GRACE_S = 5.0  # after close(), workers still alive this long are killed


def _check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; use one of {sorted(choices)}")


class _DaliProcesses:
    """One DALI pipeline and its Python workers: started with the signal policy, closed without orphans."""

    def __init__(self, pipe: Any, py_workers: int) -> None:
        self.pipe = pipe
        before = _child_pids()
        if py_workers:
            with _worker_signal_policy():
                pipe.start_py_workers()
        self.worker_pids = sorted(_child_pids() - before)
        self.built = False

    def run(self) -> Any:
        if not self.built:
            self.pipe.build()
            self.built = True
        return self.pipe.run()

    def close(self) -> None:
        """Shut the pipeline down; kill any worker that has not exited after a grace period."""
        pids, self.worker_pids = self.worker_pids, []
        killer = threading.Timer(WORKER_EXIT_GRACE_S, _kill, args=(pids,))
        killer.daemon = True
        killer.start()  # DALI joins its workers after a gentle stop; a worker ignoring SIGTERM could hang that
        self.pipe = None
        gc.collect()  # the pipeline's finalizer stops and joins the workers
        killer.cancel()
        _kill(pids)


def _child_pids() -> set[int]:
    """Pids of this process's children (Linux /proc)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def _kill(pids: list[int]) -> None:
    """SIGKILL those of `pids` that are still our children (a reaped pid may have been reused)."""
    for pid in pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent != os.getpid():
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def _worker_signal_policy() -> Iterator[None]:
    """Workers forked or spawned inside this block inherit SIGTERM ignored when inside a Slurm job."""
    if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SIG_IGN survives fork and exec
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_method() -> str:
    """'fork' is cheap but unsafe once this process holds a CUDA context; 'spawn' is then used."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def apply_colour(images: torch.Tensor, colour: torch.Tensor, dtype: torch.dtype, layout: str,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """Colour jitter + normalisation + layout + dtype of a batch in one batched matrix product.

    Args:
        images: (B, H, W, 3) float32 RGB on the 0-255 scale (may be DALI's buffer: only read here).
        colour: (B, 3, 5) float32 per-sample [M | t0 | v] (pipeline.augment.colour_params):
            out = M @ rgb + t0 + v * gray_mean, gray_mean = the image's mean luma.
        dtype: output dtype; layout: 'NCHW' or 'NHWC' (the output's shape order).
        work: optional float32 scratch of B * H * W * 3 elements, reused between batches when the
            output is cast to another dtype (saves allocating and faulting in 40 MB per batch).

    Returns:
        A new tensor (B, 3, H, W) or (B, H, W, 3) of `dtype`.

    Measured on 2 CPU cores: ~0.35 ms per 224x224 image, where DALI's coord_transform plus its
    fp16/CHW cast cost ~1 ms; one bmm with a transposed operand writes CHW directly.
    """
    b, h, w, c = images.shape
    pixels = images.reshape(b, h * w, c)
    luma = torch.tensor(LUMA, dtype=pixels.dtype, device=pixels.device)
    # Contrast pivots on the mean luma; every 5th pixel (10,035 of a 224x224 image; 5 is coprime with
    # the width, so the samples do not stack in columns) gives it to well under a grey level, at a
    # fifth of the cost of a full pass.
    gray_mean = pixels[:, ::5].mean(dim=1) @ luma
    m, t = colour[:, :, :3], colour[:, :, 3] + colour[:, :, 4] * gray_mean[:, None]
    out = None
    if dtype != images.dtype and work is not None and work.numel() == images.numel():
        out = work.view(b, c, h * w) if layout == "NCHW" else work.view(b, h * w, c)
    if layout == "NCHW":
        out = torch.baddbmm(t[:, :, None], m, pixels.transpose(1, 2), out=out).view(b, c, h, w)
    else:
        out = torch.baddbmm(t[:, None, :], pixels, m.transpose(1, 2), out=out).view(b, h, w, c)
    return out.to(dtype)


@contextlib.contextmanager
def _one_torch_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the colour product on this thread only: DALI's threads already hold the task's
    cores, and torch's other OpenMP threads would spin against them (measured here: the product then
    costs 0.35 CPU ms per image instead of ~0.75)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """A DALI output batch as a torch tensor: a view of DALI's buffer on the CPU (valid until the next
    run; only read before that), a copy on the GPU."""
    tensor = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(tensor))
    return _to_torch(tensor_list, device)


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """A DALI output batch as a torch tensor that owns its memory (DALI reuses its buffers)."""
    tensor = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(tensor))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _undecodable(path: Path) -> bool:
    """Full decode with PIL: the judge when DALI dies and the byte screen passed the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return False
    except Exception:  # noqa: BLE001 - any failure to decode means the file is bad
        return True


class _Closing:
    """Context manager and finaliser around `close()`: worker processes never outlive their loader."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_L = TypeVar("_L", bound=_Closing)


class TrainLoader(_Closing):
    """Augmented training batches of this rank: DALI graph fed in (class-aware) sampler order.

    Args:
        index: training images; files in `exclude` are dropped before sampling.
        batch_size: images per rank and step.
        rank, world_size: global rank and world size (shards are interleaved, pipeline.sampling).
        local_rank: the GPU of this process for device='gpu'.
        device: 'gpu' (mixed decode, GPU ops, CUDA tensors) or 'cpu' (all-CPU DALI, CPU tensors).
        seed: run seed: sample order and augmentation draws.
        sampling: 'class_aware' (Relay-BP) or 'shuffle'.
        samples_per_epoch: global samples per epoch; None = the data set's size.
        aug: augmentation ranges.
        crop_size: output side in pixels.
        dtype: 'float16' or 'float32'; layout: 'NCHW' or 'NHWC' (the tensor's shape is in that order).
        threads: DALI CPU threads; None = the task's CPU share minus py_workers.
        py_workers: processes reading files and drawing parameters (0: in this process).
        prefetch: batches DALI prepares ahead.
        exclude: root-relative paths never to read (check-data's exclusion list).

    Iterating yields (images, labels): images (B, C, H, W) or (B, H, W, C) normalised, labels int64.
    """

    def __init__(self, index: ImageIndex, *, batch_size: int, rank: int, world_size: int, local_rank: int,
                 device: str, seed: int, sampling: str, samples_per_epoch: int | None, aug: AugmentSpec,
                 crop_size: int, dtype: str, layout: str, threads: int | None, py_workers: int, prefetch: int,
                 exclude: set[str] | frozenset[str] = frozenset()) -> None:
        _check_choice("device", device, {"cpu", "gpu"})
        _check_choice("sampling", sampling, SAMPLERS)
        _check_choice("dtype", dtype, TORCH_DTYPES)
        _check_choice("layout", layout, {"NCHW", "NHWC"})
        if batch_size < 1 or crop_size < 1 or prefetch < 1 or py_workers < 0:
            raise ValueError(f"batch_size={batch_size}, crop_size={crop_size}, prefetch={prefetch} must be >= 1 "
                             f"and py_workers={py_workers} >= 0")
        self.index = index.without(exclude)
        if not len(self.index):
            raise ValueError(f"{index.root}: no training images left after excluding {len(exclude)} files")
        self.sampler = SAMPLERS[sampling](self.index.labels, world_size, rank, seed, samples_per_epoch)
        if len(self.sampler) < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds this rank's {len(self.sampler)} samples per epoch; "
                             f"use a smaller batch or more samples_per_epoch")
        self.batch_size, self.seed, self.aug, self.crop_size = batch_size, seed, aug, crop_size
        self.device_kind, self.dtype, self.layout, self.prefetch = device, dtype, layout, prefetch
        self.device = torch.device(f"cuda:{local_rank}") if device == "gpu" else torch.device("cpu")
        self.local_rank, self.py_workers = local_rank, py_workers
        self.threads = threads or default_threads(py_workers)
        self.stats: dict[str, Any] = {"replaced_samples": 0, "replaced_files": 0, "bad_files": [], "rebuilds": 0}
        self._bad: set[int] = set()
        self._epoch, self._start, self._consumed = 0, 0, 0
        self._run: _DaliProcesses | None = None
        self._work: torch.Tensor | None = None  # apply_colour's scratch
        self._run_next: tuple[int, int] | None = None  # (epoch, sample) the pipeline delivers next
        self._decoder = decoder_options(device, local_rank)
        self._open(0, 0)  # workers start now, before the caller initialises CUDA

    # ------------------------------------------------------------------ public interface
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the epoch just resumed keeps its resume point."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} is invalid; epochs count from 0")
        if epoch != self._epoch:
            self._epoch, self._start, self._consumed = epoch, 0, 0
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._start, self._consumed = 0, start  # iterating this epoch again starts at its beginning
        if self._run_next != (epoch, start):
            self._open(epoch, start)
        for _ in range((len(self.sampler) - start) // self.batch_size):
            images, labels = self._next_batch(epoch)
            self._consumed += self.batch_size
            self._run_next = (epoch, self._consumed)
            yield images, labels
        self._end_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and GLOBAL position of the next sample (plain values; world-size independent)."""
        sampler = self.sampler.state_dict(consumed=self._consumed)
        return {"format": STATE_FORMAT, "epoch": sampler["epoch"], "global_position": sampler["global_position"],
                "batch_size": self.batch_size, "sampler": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken: same samples, same augmentation draws."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        self.sampler.load_state_dict(state["sampler"])
        self._epoch, self._start = self.sampler.epoch, self.sampler.position
        self._consumed = self._start

    def close(self) -> None:
        """Stop the pipeline and its worker processes (idempotent)."""
        run, self._run, self._run_next = self._run, None, None
        if run is not None:
            run.close()

    # ------------------------------------------------------------------ pipeline lifecycle
    def _open(self, epoch: int, start: int) -> None:
        """(Re)build the pipeline so that it delivers (epoch, start) next."""
        self.close()
        source = TrainSource(str(self.index.root), self.index.files, self.index.labels, self.sampler, self.aug,
                             self.crop_size, self.seed, epoch, start, self.batch_size, frozenset(self._bad))
        pipe = train_pipeline(
            source=source, decoder=self._decoder, crop_size=self.crop_size, parallel=self.py_workers > 0,
            batch_size=self.batch_size, num_threads=self.threads, prefetch_queue_depth=self.prefetch,
            device_id=self.local_rank if self.device_kind == "gpu" else None, seed=self.seed,
            py_num_workers=max(1, self.py_workers), py_start_method=_start_method())
        self._run = _DaliProcesses(pipe, self.py_workers)
        self._run_next = (epoch, start)

    def _next_batch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        for attempt in range(MAX_REBUILDS + 1):
            try:
                images, labels, colour, replaced, positions = self._run.run()
                break
            except RuntimeError as error:  # a file the screen let through killed the pipeline
                if attempt == MAX_REBUILDS or not self._find_bad_files(epoch, str(error)):
                    raise
                self.stats["rebuilds"] += 1
                self._open(epoch, self._consumed)
        self._note_replaced(np.array(replaced.as_tensor()).ravel(), np.array(positions.as_tensor()).ravel(), epoch)
        colour = torch.from_numpy(np.array(colour.as_tensor())).to(self.device)
        images = _as_torch(images, self.device)
        if self._work is None or self._work.device != images.device or self._work.numel() != images.numel():
            self._work = torch.empty(images.numel(), dtype=torch.float32, device=images.device)
        with _one_torch_thread(images.device):
            images = apply_colour(images, colour, TORCH_DTYPES[self.dtype], self.layout, self._work)
        labels = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)).to(self.device, non_blocking=True)
        return images, labels

    def _end_epoch(self, epoch: int) -> None:
        """Consume the pipeline's end-of-epoch signal so that it is ready for the next epoch."""
        try:
            self._run.run()
        except StopIteration:
            self._run.pipe.reset()
            self._run_next = (epoch + 1, 0)
        else:  # cannot happen with whole batches; rebuild rather than deliver a wrong sample
            self._run_next = None

    def _find_bad_files(self, epoch: int, error: str) -> bool:
        """Decode the batches in flight with PIL; remember the failures. False when none fails."""
        ahead = (self.prefetch + 2) * self.batch_size
        indices = self.sampler.rank_indices(epoch)[self._consumed:self._consumed + ahead].tolist()
        found = [i for i in dict.fromkeys(indices) if i not in self._bad and _undecodable(self.index.path(i))]
        for i in found:
            log.warning("undecodable file %s killed the input pipeline (%s); it is replaced by samples of its "
                        "class from now on", self.index.path(i), error.strip().splitlines()[-1][:200])
        self._bad.update(found)
        return bool(found)

    def _note_replaced(self, replaced: np.ndarray, positions: np.ndarray, epoch: int) -> None:
        for index, position in zip(replaced.tolist(), positions.tolist()):
            if index < 0:
                continue
            self.stats["replaced_samples"] += 1
            name = self.index.files[index]
            if name not in self.stats["bad_files"]:
                self.stats["bad_files"].append(name)
                self.stats["replaced_files"] += 1
                log.warning("undecodable file %s (class %s) replaced by another image of its class "
                            "(epoch %d, global position %d)", self.index.path(index),
                            self.index.classes[self.index.labels[index]], epoch, position)


class EvalLoader(_Closing):
    """Eval batches: every file once over all ranks, in file order, contiguous shards, no padding.

    Iterating yields (images, labels, positions): positions index `index.files`; images are
    (B, C, H, W) / (B, H, W, C), or (B, 10, C, H, W) / (B, 10, H, W, C) with ten_crop (4 corners and
    the centre, then their mirrors). The last batch may be short. Labels are -1 for unlabelled sets.
    Files that cannot be decoded come out as a blank image and are counted in stats['bad_files'].
    """

    def __init__(self, index: ImageIndex, *, batch_size: int, rank: int, world_size: int, local_rank: int,
                 device: str, crop_size: int, crop_ratio: float = 0.875, ten_crop: bool = False,
                 dtype: str = "float32", layout: str = "NCHW", threads: int | None = None, py_workers: int = 0,
                 exclude: set[str] | frozenset[str] = frozenset()) -> None:
        _check_choice("device", device, {"cpu", "gpu"})
        _check_choice("dtype", dtype, TORCH_DTYPES)
        _check_choice("layout", layout, {"NCHW", "NHWC"})
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio={crop_ratio} is invalid; use a value in (0, 1], e.g. 0.875")
        keep = np.array([i for i, f in enumerate(index.files) if f not in exclude], dtype=np.int64)
        lo, hi = len(keep) * rank // world_size, len(keep) * (rank + 1) // world_size
        self.index, self.batch_size, self.positions = index, batch_size, keep[lo:hi]
        self.device = torch.device(f"cuda:{local_rank}") if device == "gpu" else torch.device("cpu")
        self.stats: dict[str, Any] = {"bad_files": []}
        source = EvalSource(str(index.root), index.files, np.asarray(index.labels), self.positions, batch_size)
        self._batches = len(source)
        pipe = eval_pipeline(
            source=source, decoder=decoder_options(device, local_rank), crop_size=crop_size, crop_ratio=crop_ratio,
            ten_crop=ten_crop, dtype=dtype, layout=layout, parallel=py_workers > 0, batch_size=batch_size,
            num_threads=threads or default_threads(py_workers), device_id=local_rank if device == "gpu" else None,
            py_num_workers=max(1, py_workers), py_start_method=_start_method(), prefetch_queue_depth=2)
        self._run: _DaliProcesses | None = _DaliProcesses(pipe, py_workers)
        self._fresh = True

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._run is None:
            raise RuntimeError("EvalLoader is closed")
        if not self._fresh:
            self._run.pipe.reset()
        self._fresh = False
        for _ in range(self._batches):
            images, labels, positions, bad = self._run.run()
            positions = torch.from_numpy(np.array(positions.as_tensor()).reshape(-1))
            for p, b in zip(positions.tolist(), np.array(bad.as_tensor()).ravel().tolist()):
                if b:
                    self.stats["bad_files"].append(self.index.files[p])
                    log.warning("undecodable eval file %s: scored as a blank image", self.index.path(p))
            labels = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)).to(self.device, non_blocking=True)
            yield _to_torch(images, self.device), labels, positions
        with contextlib.suppress(StopIteration):
            self._run.run()  # the end-of-epoch signal; reset at the next iteration

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.close()


__all__ = ["TrainLoader", "EvalLoader", "AugmentSpec"]
