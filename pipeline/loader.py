"""Torch iterators over the DALI graphs: TrainLoader (resumable, sharded, class-aware) and EvalLoader.

Resume is exact without DALI checkpoints: every random choice is a pure function of (seed, epoch,
global position) (pipeline.sampling, pipeline.augment), so the state is just the epoch and the global
position of the next sample. A pipeline always knows which (epoch, position) it delivers next; when
the consumer asks for another one (a resume, an epoch skipped, an epoch iterated again) it is rebuilt.

Process hygiene (pipeline.processes): Python workers are started in the constructor, so build
loaders before CUDA/NCCL is initialised; a rebuild after that spawns them instead of forking, as DALI
requires once the CUDA driver is up. Workers ignore SIGTERM inside a Slurm job (Slurm warns every task
with SIGTERM before a requeue, and the job must keep running until its checkpoint), die with their
parent (PR_SET_PDEATHSIG), and are gone after `close()`, after an exception in a `with` block, and
after Ctrl-C.

No host synchronisation per batch on the GPU: labels and colour matrices reach the GPU inside the
DALI pipeline, ahead of time; DALI's outputs are copied into torch tensors on torch's current stream
without waiting on the host; constants live on the device once.

Bad data: excluded files are never sampled; a file that fails the byte screen at run time is
replaced in the worker by a same-class sample chosen from (seed, epoch, position), named in the log
and counted in `stats`; a file that passes the screen but still kills the pipeline is found by
decoding the in-flight batches with PIL, remembered, and the pipeline is rebuilt at the position
of the next batch, so the replacement is the same as an uninterrupted run that knew it was bad.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import numpy as np
import torch

from pipeline.augment import LUMA, AugmentSpec
from pipeline.dali import EvalSource, TrainSource, eval_pipeline, pipeline_args, source_depth, train_pipeline
from pipeline.datasets import ImageIndex
from pipeline.input_spec import EvalInput, Runtime, TrainInput
from pipeline.processes import DaliProcesses
from pipeline.sampling import ClassAwareSampler, ShuffleSampler

log = logging.getLogger("senet.input")
STATE_FORMAT = 1
SAMPLERS = {"class_aware": ClassAwareSampler, "shuffle": ShuffleSampler}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_REBUILDS = 8  # pipeline deaths tolerated per epoch before the error is raised


@dataclass
class InputTimes:
    """Where a TrainLoader's host time went since the last `TrainLoader.take_timings` (seconds, summed
    over batches): what the stall alarm and `bench-train` can observe without synchronising a device.

    `read_s` is spent in the source (Python workers in parallel, or this process inside `graph_s`
    when there are none); `graph_s` is time blocked waiting for the DALI pipeline (decode and
    augmentation together, and the source when it falls behind); `copy_s` the copy into torch tensors
    (on a GPU: launching it); `colour_s` the colour pass (on a GPU: launching it); `startup_s` the first
    batch of a freshly built or reset pipeline (building it, filling its queues), kept apart.
    """

    batches: int = 0
    read_s: float = 0.0
    graph_s: float = 0.0
    copy_s: float = 0.0
    colour_s: float = 0.0
    startup_s: float = 0.0


def _torch_device(runtime: Runtime) -> torch.device:
    """The torch device a loader's batches land on: the runtime's GPU, or the CPU."""
    return torch.device("cuda", runtime.device_id) if runtime.device == "gpu" else torch.device("cpu")


_LUMA: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _luma(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The luma weights on `device`, copied there once (a per-batch copy would synchronise the host)."""
    key = (device, dtype)
    if key not in _LUMA:
        _LUMA[key] = torch.tensor(LUMA, dtype=dtype, device=device)
    return _LUMA[key]


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

    One bmm with a transposed operand writes CHW directly: cheaper than DALI's coord_transform plus its
    fp16/CHW cast (per-image costs: benchmarks/RESULTS_input.md, "Where the time goes").
    """
    b, h, w, c = images.shape
    pixels = images.reshape(b, h * w, c)
    luma = _luma(pixels.device, pixels.dtype)
    # Contrast pivots on the mean luma; every 5th pixel (10,035 of a 224x224 image; 5 is coprime with
    # the width, so the samples do not stack in columns) gives it to well under a grey level, at a
    # fifth of the cost of a full pass. A product and a sum per row, not `@ luma`: a matrix-vector
    # product rounds a row differently with the batch around it, and a sample must come out the same
    # bits in a batch of one virtual rank or of several (training.virtual).
    gray_mean = (pixels[:, ::5].mean(dim=1) * luma).sum(dim=1)
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
    cores, and torch's other OpenMP threads would spin against them (about twice the CPU time per image:
    benchmarks/RESULTS_input.md)."""
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


def _undecodable(index: ImageIndex, i: int) -> bool:
    """Full decode with PIL: the judge when DALI dies and the byte screen passed the file."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(index.read(i))) as img:
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
    """Augmented training batches of this process: DALI graph fed in (class-aware) sampler order.

    Args:
        index: training images; files in `exclude` are dropped before sampling.
        spec: what the batches hold (`pipeline.input_spec.TrainInput`: batch size per rank, seed, sampling,
            samples per epoch, augmentation, the crop size of each epoch, normalisation, dtype, layout) and
            how they are produced (its `runtime`: device, threads, Python workers, prefetch, decoder).
        rank, world_size: the (first) shard this process reads and the number of shards: the global rank and
            world size, or a run's virtual ranks (shards are interleaved, pipeline.sampling).
        hosted: how many shards this process reads, rank .. rank + hosted - 1 (the virtual ranks it hosts).
        exclude: root-relative paths never to read (check-data's exclusion list).

    Iterating yields (images, labels), one batch of `spec.batch_size` per shard and step, the shards of a
    step in turn: images (B, C, S, S) or (B, S, S, C) normalised, S = `spec.crop_size(epoch)`, labels
    int64, both on the loader's device. A shard's batch is the same whichever process reads it, and
    with however many other shards (one DALI batch each). `take_timings()` says where the host time of
    the batches since its last call went (`InputTimes`: the stall alarm's and `bench-train`'s
    breakdown), from host clocks only.
    """

    def __init__(self, index: ImageIndex, spec: TrainInput, *, rank: int = 0, world_size: int = 1, hosted: int = 1,
                 exclude: set[str] | frozenset[str] = frozenset()) -> None:
        if spec.sampling not in SAMPLERS:
            raise ValueError(f"sampling={spec.sampling!r} is invalid; use one of {sorted(SAMPLERS)}")
        self.spec = spec
        self.device = _torch_device(spec.runtime)
        self.index = index.without(exclude)
        if not len(self.index):
            raise ValueError(f"{index.root}: no training images left after excluding {len(exclude)} files")
        self.samplers = self._samplers(rank, world_size, hosted)
        self.stats: dict[str, Any] = {"replaced_samples": 0, "replaced_files": 0, "bad_files": [], "rebuilds": 0}
        self._bad: set[int] = set()
        self._epoch, self._start, self._consumed, self._micro = 0, 0, 0, 0
        self._run: DaliProcesses | None = None
        self._work: torch.Tensor | None = None  # apply_colour's scratch
        # (epoch, samples of each shard, batches of the step) the pipeline delivers next
        self._run_next: tuple[int, int, int] | None = None
        self._times = InputTimes()
        self._cold = True  # the next batch comes from a pipeline just built or reset
        self._open(0, 0)  # workers start now, before the caller initialises CUDA

    def _samplers(self, rank: int, world_size: int, hosted: int) -> tuple[Any, ...]:
        if hosted < 1 or rank + hosted > world_size:
            raise ValueError(f"shards {rank}..{rank + hosted - 1} are out of range for {world_size} shards")
        spec = self.spec
        first = SAMPLERS[spec.sampling](self.index.labels, world_size, rank, spec.seed, spec.samples_per_epoch)
        if len(first) < spec.batch_size:
            raise ValueError(f"batch_size={spec.batch_size} exceeds this rank's {len(first)} samples per epoch; "
                             f"use a smaller batch or more samples_per_epoch")
        return (first, *(first.for_rank(rank + j) for j in range(1, hosted)))

    # ------------------------------------------------------------------ public interface
    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def sampler(self) -> Any:
        """The sampler of the first shard this process reads (the others are its siblings)."""
        return self.samplers[0]

    @property
    def hosted(self) -> int:
        """Shards this process reads: batches per step."""
        return len(self.samplers)

    @property
    def crop_size(self) -> int:
        """The side of this epoch's images (`spec.crop_size(epoch)`): it changes only at an epoch boundary."""
        return self.spec.crop_size(self._epoch)

    def __len__(self) -> int:
        """Batches per epoch from this process (the same in every process): each shard's whole batches."""
        return len(self.sampler) // self.batch_size * self.hosted

    def shard(self, rank: int, world_size: int, hosted: int = 1) -> None:
        """Read shards rank .. rank + hosted - 1 of `world_size` from now on, from the start of the current epoch
        (`load_state_dict` then places it); the pipeline is rebuilt at the next iteration."""
        self.samplers = self._samplers(rank, world_size, hosted)
        for sampler in self.samplers:
            sampler.set_epoch(self._epoch)
        self._start = self._consumed = self._micro = 0
        self._run_next = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the epoch just resumed keeps its resume point."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} is invalid; epochs count from 0")
        if epoch != self._epoch:
            self._epoch, self._start, self._consumed, self._micro = epoch, 0, 0, 0
            for sampler in self.samplers:
                sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._start, self._consumed, self._micro = 0, start, 0  # iterating this epoch again starts at its beginning
        if self._run_next != (epoch, start, 0):
            self._open(epoch, start)
        for _ in range((len(self.sampler) - start) // self.batch_size):
            for _shard in range(self.hosted):
                images, labels = self._next_batch(epoch)
                self._micro += 1
                if self._micro == self.hosted:  # a step's batches are all out: its samples count as used
                    self._consumed, self._micro = self._consumed + self.batch_size, 0
                self._run_next = (epoch, self._consumed, self._micro)
                yield images, labels
        self._end_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and GLOBAL position of the next sample (plain values; independent of the process count)."""
        sampler = self.sampler.state_dict(consumed=self._consumed)
        return {"format": STATE_FORMAT, "epoch": sampler["epoch"], "global_position": sampler["global_position"],
                "batch_size": self.batch_size, "sampler": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken: same samples, same augmentation draws."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        for sampler in self.samplers:
            sampler.load_state_dict(state["sampler"])
        self._epoch, self._start = self.sampler.epoch, self.sampler.position
        self._consumed, self._micro = self._start, 0

    def take_timings(self) -> InputTimes:
        """The host time per stage since the last call (see `InputTimes`), and start counting afresh."""
        times, self._times = self._times, InputTimes()
        return times

    def close(self) -> None:
        """Stop the pipeline and its worker processes (idempotent)."""
        run, self._run, self._run_next = self._run, None, None
        if run is not None:
            run.close()

    # ------------------------------------------------------------------ pipeline lifecycle
    def _open(self, epoch: int, start: int, skip: int = 0) -> None:
        """(Re)build the pipeline so that it delivers (epoch, start) next, less the step's first `skip` batches."""
        self.close()
        spec = self.spec
        source = TrainSource(str(self.index.root), self.index.files, self.index.labels, self.samplers, spec, epoch,
                             start, frozenset(self._bad), samples=self.index.samples, skip=skip)
        pipe = train_pipeline(source=source, runtime=spec.runtime, seed=spec.seed,
                              **pipeline_args(spec.batch_size, spec.runtime))
        self._run = DaliProcesses(pipe, spec.runtime.py_workers)
        self._run_next = (epoch, start, skip)
        self._cold = True

    def _next_batch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Host clocks only (perf_counter): nothing here waits on a device to time it.
        t0 = time.perf_counter()
        cold = self._cold
        for attempt in range(MAX_REBUILDS + 1):
            try:
                images, labels, colour, ids = self._run.run()
                break
            except RuntimeError as error:  # a file the screen let through killed the pipeline
                if attempt == MAX_REBUILDS or not self._find_bad_files(epoch, str(error)):
                    raise
                self.stats["rebuilds"] += 1
                self._open(epoch, self._consumed, self._micro)
        self._cold = False
        t1 = time.perf_counter()
        ids = np.array(ids.as_tensor())  # (B, 4) on the host: TRAIN_IDS
        self._note_replaced(ids[:, 1], ids[:, 2], epoch)
        colour = _as_torch(colour, self.device)
        images = _as_torch(images, self.device)
        labels = _to_torch(labels, self.device)
        if self._work is None or self._work.device != images.device or self._work.numel() != images.numel():
            self._work = torch.empty(images.numel(), dtype=torch.float32, device=images.device)
        t2 = time.perf_counter()
        with _one_torch_thread(images.device):
            images = apply_colour(images, colour, TORCH_DTYPES[self.spec.dtype], self.spec.layout, self._work)
        t3 = time.perf_counter()
        times = self._times
        times.batches += 1
        times.read_s += float(ids[:, 3].sum()) * 1e-9
        if cold:
            times.startup_s += t1 - t0
        else:
            times.graph_s += t1 - t0
        times.copy_s += t2 - t1
        times.colour_s += t3 - t2
        return images, labels

    def _end_epoch(self, epoch: int) -> None:
        """Consume the pipeline's end-of-epoch signal so that it is ready for the next epoch."""
        try:
            self._run.run()
        except StopIteration:
            self._run.reset()
            self._run_next = (epoch + 1, 0, 0)
            self._cold = True  # the next epoch's first batch waits for the queues to fill again
        else:  # cannot happen with whole batches; rebuild rather than deliver a wrong sample
            self._run_next = None

    def _find_bad_files(self, epoch: int, error: str) -> bool:
        """Decode the batches in flight with PIL; remember the failures. False when none fails."""
        rt = self.spec.runtime
        ahead = (source_depth(rt.prefetch, rt.py_workers) + rt.prefetch + 2) * self.batch_size
        indices = [i for sampler in self.samplers
                   for i in sampler.rank_indices(epoch)[self._consumed:self._consumed + ahead].tolist()]
        found = [i for i in dict.fromkeys(indices) if i not in self._bad and _undecodable(self.index, i)]
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

    Args:
        index: the images (labels -1 for unlabelled sets).
        spec: what the batches hold and how they are produced (`pipeline.input_spec.EvalInput`).
        rank, world_size: this process's contiguous shard.
        exclude: root-relative paths never to read (they get no row).

    Iterating yields (images, labels, positions): positions (on the host) index `index.files`; images
    are (B, C, H, W) / (B, H, W, C), or (B, 10, C, H, W) / (B, 10, H, W, C) with `spec.ten_crop` (4
    corners and the centre, then their mirrors); images and labels are on the loader's device. The last
    batch may be short. Files that cannot be decoded come out as a blank image and are counted in
    stats['bad_files']. The runtime's prefetch works as TrainLoader's: batches DALI prepares ahead, and
    the source computes as many ahead as keep every Python worker busy.
    """

    def __init__(self, index: ImageIndex, spec: EvalInput, *, rank: int = 0, world_size: int = 1,
                 exclude: set[str] | frozenset[str] = frozenset()) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
        self.spec = spec
        self.device = _torch_device(spec.runtime)
        keep = np.array([i for i, f in enumerate(index.files) if f not in exclude], dtype=np.int64)
        lo, hi = len(keep) * rank // world_size, len(keep) * (rank + 1) // world_size
        self.index, self.batch_size, self.positions = index, spec.batch_size, keep[lo:hi]
        self.stats: dict[str, Any] = {"bad_files": []}
        source = EvalSource(str(index.root), index.files, np.asarray(index.labels), self.positions, spec.batch_size,
                            index.samples)
        self._batches = len(source)
        pipe = eval_pipeline(source=source, spec=spec, **pipeline_args(spec.batch_size, spec.runtime))
        self._run: DaliProcesses | None = DaliProcesses(pipe, spec.runtime.py_workers)
        self._fresh = True

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._run is None:
            raise RuntimeError("EvalLoader is closed")
        if not self._fresh:
            self._run.reset()
        self._fresh = False
        for _ in range(self._batches):
            images, labels, ids = self._run.run()
            ids = np.array(ids.as_tensor())  # (B, 3) on the host: label, position, bad
            for p in ids[ids[:, 2] != 0, 1].tolist():
                self.stats["bad_files"].append(self.index.files[p])
                log.warning("undecodable eval file %s: scored as a blank image", self.index.path(p))
            yield _to_torch(images, self.device), _to_torch(labels, self.device), torch.from_numpy(ids[:, 1].copy())
        with contextlib.suppress(StopIteration):
            self._run.run()  # the end-of-epoch signal; reset at the next iteration

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.close()


class ResidentLoader(_Closing):
    """Batches of tensors that already sit on the device, in a fixed order: the synthetic input of
    `bench-train`, the benchmarks and the tests, behind the TrainLoader interface (resumable position)
    or, with `positions=True`, the EvalLoader one.

    Args:
        images, labels: (N, ...) and (N,) tensors; batch k of an epoch holds rows k*B .. k*B+B-1
            (modulo N: a few rows can serve many steps).
        batch_size: rows per batch (B).
        steps: batches per epoch (default N // B); with `positions`, every row once and the last
            batch may be short.
        positions: yield (images, labels, positions) as EvalLoader does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int | None = None,
                 positions: bool = False) -> None:
        if len(images) != len(labels) or not len(images) or batch_size < 1:
            raise ValueError(f"{len(images)} images, {len(labels)} labels and batch_size={batch_size}: need as many "
                             f"labels as images, at least one, and a batch of at least one")
        self.images, self.labels, self.batch_size, self.positions = images, labels, batch_size, positions
        n = len(images)
        self.steps = -(-n // batch_size) if positions else (steps or max(1, n // batch_size))
        self._epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self.steps

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def crop_size(self) -> int | None:
        """None: resident tensors keep the shape they were given, whatever the epoch."""
        return None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._start = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n, b, device = len(self.images), self.batch_size, self.images.device
        start, self._start = self._start, 0
        for k in range(start, self.steps):
            self._start = k + 1  # the state_dict's position, while the caller works on this batch
            # the row indices are made where the rows are: a host index would be copied (and waited for) per batch
            if self.positions:
                rows = torch.arange(k * b, min(n, (k + 1) * b))
                on_device = rows.to(device, non_blocking=True)
                yield self.images[on_device], self.labels[on_device.to(self.labels.device)], rows
            else:
                rows = torch.arange(k * b, (k + 1) * b, device=device) % n
                yield self.images[rows], self.labels[rows.to(self.labels.device)]
        self._start = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self._epoch, "batch": self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._start = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        """Nothing to stop: no pipeline, no worker."""


def endless(loader: Any, epoch: int = 0) -> Iterator[Any]:
    """The loader's batches epoch after epoch from `epoch` on (for benchmarks that outlast an epoch)."""
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


__all__ = ["TrainLoader", "EvalLoader", "ResidentLoader", "AugmentSpec", "TrainInput", "EvalInput", "Runtime", "InputTimes",
           "apply_colour", "endless"]
