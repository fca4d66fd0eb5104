"""What an input produces, described once: `TrainInput` and `EvalInput`, frozen, handed loader -> source -> graph.

A loader, its Python source and its DALI graph all read the same spec object; nothing about the
images (their size in any epoch, dtype, layout, normalisation, augmentation, sample order) is passed
along a second path that could disagree. The specs are resolved from a run's configuration and its
placement in one function (`training.inputs`); `pipeline` itself knows nothing of configs.

Progressive resizing lives in `CropSchedule`: the training crop side is a function of the epoch
there and nowhere else. The loader's source reads it per epoch and hands the size to the graph as a
per-sample argument next to the warp matrix drawn for that size, so the host draws and the graph's
output change together, at an epoch boundary, without rebuilding the pipeline (why not a rebuild:
benchmarks/RESULTS_tta.md, "Changing the size").

`Runtime` is where the graph runs and with how many threads, workers and batches in flight: it
changes how fast batches come, never what they hold (tested: workers and prefetch depth give the
same batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec

# Share of the JPEGs given to the hardware decoder (A100, H100, H200 and their kin have one; DALI
# ignores the value elsewhere). 0.65 is DALI's default and NVIDIA's ResNet-50 example's choice: the
# rest keeps the CPU threads' hybrid decoding busy too.
HW_DECODER_LOAD = 0.65
DTYPES = ("float16", "float32")
LAYOUTS = ("NCHW", "NHWC")
DEVICES = ("cpu", "gpu")
SAMPLINGS = ("class_aware", "shuffle")
# FFCV's ResNet-50 recipes ramp the resolution over the late epochs: rn50_88_epochs.yaml from epoch 65 to
# epoch 76 of 88 (start_ramp, end_ramp). A ramp given as null in the config keeps that shape, scaled to the
# run's epochs.
RAMP_START_FRACTION, RAMP_END_FRACTION = 65 / 88, 76 / 88


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; use one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class Runtime:
    """Where an input graph runs: 'gpu' (mixed decoding on CUDA ordinal `device_id`) or 'cpu', its DALI
    threads, Python workers, batches in flight, and the hardware decoder's share of the JPEGs."""

    device: str = "cpu"
    device_id: int | None = None
    threads: int = 1
    py_workers: int = 0
    prefetch: int = 2
    hw_decoder_load: float = HW_DECODER_LOAD

    def __post_init__(self) -> None:
        _one_of("device", self.device, DEVICES)
        if self.device == "gpu" and (self.device_id is None or self.device_id < 0):
            raise ValueError(f"device='gpu' needs device_id (a CUDA ordinal), got {self.device_id!r}")
        if self.threads < 1 or self.prefetch < 1 or self.py_workers < 0:
            raise ValueError(f"threads={self.threads} and prefetch={self.prefetch} must be >= 1 and "
                             f"py_workers={self.py_workers} >= 0")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load={self.hw_decoder_load} is invalid; use a share in [0, 1]")


@dataclass(frozen=True)
class CropSchedule:
    """The training crop side per epoch (epochs count from 0, as in metrics.jsonl).

    Fixed at `final` when `start` is None. Otherwise `start` up to epoch `ramp_start`, `final` from
    epoch `ramp_end` on, and in between the linear interpolation rounded to the nearest multiple of
    `multiple` (halves round up), kept within [start, final]: the shape of FFCV's `get_resolution`
    (ffcv-imagenet, train_imagenet.py).
    """

    final: int
    start: int | None = None
    ramp_start: int = 0
    ramp_end: int = 0
    multiple: int = 32

    def __post_init__(self) -> None:
        if self.final < 1 or self.multiple < 1:
            raise ValueError(f"crop size {self.final} and multiple {self.multiple} must be >= 1")
        if self.start is not None:
            if not 1 <= self.start <= self.final:
                raise ValueError(f"the first crop size {self.start} must lie in [1, the final size {self.final}]")
            if not 0 <= self.ramp_start <= self.ramp_end:
                raise ValueError(f"the resizing ramp from epoch {self.ramp_start} to epoch {self.ramp_end} is "
                                 f"invalid: it needs 0 <= start <= end")

    @classmethod
    def ffcv_ramp(cls, final: int, start: int | None, epochs: int, ramp_start: int | None = None,
                  ramp_end: int | None = None, multiple: int = 32) -> CropSchedule:
        """A schedule whose unspecified ramp (None) takes FFCV's shape: from 65/88 to 76/88 of the epochs."""
        first = round(epochs * RAMP_START_FRACTION) if ramp_start is None else ramp_start
        last = round(epochs * RAMP_END_FRACTION) if ramp_end is None else ramp_end
        return cls(final=final, start=start, ramp_start=first, ramp_end=max(first, last), multiple=multiple)

    @property
    def progressive(self) -> bool:
        return self.start is not None and self.start != self.final

    def at(self, epoch: int) -> int:
        """The crop side of `epoch`."""
        if not self.progressive:
            return self.final
        if epoch <= self.ramp_start:
            return self.start
        if epoch >= self.ramp_end:
            return self.final
        share = (epoch - self.ramp_start) / (self.ramp_end - self.ramp_start)
        size = self.start + share * (self.final - self.start)
        rounded = int(math.floor(size / self.multiple + 0.5)) * self.multiple
        return min(self.final, max(self.start, rounded))  # a start or final size off the grid is never passed

    def sizes(self, epochs: int) -> list[int]:
        """The crop side of each of the first `epochs` epochs."""
        return [self.at(e) for e in range(epochs)]

    def describe(self, epochs: int) -> str:
        """'224 px' or '160 px for epochs 1-66, 192 px for epochs 67-88' (epochs counted from 1, as the log does)."""
        sizes = self.sizes(epochs)
        if len(set(sizes)) <= 1:
            return f"{sizes[0] if sizes else self.final} px"
        runs, first = [], 0
        for e in range(1, epochs + 1):
            if e == epochs or sizes[e] != sizes[first]:
                span = f"epoch {first + 1}" if e == first + 1 else f"epochs {first + 1}-{e}"
                runs.append(f"{sizes[first]} px for {span}")
                first = e
        return ", ".join(runs)


def _check_output(spec: Any) -> None:
    """A spec's dtype, layout and normalisation; mean and std kept as tuples (a config gives lists), so that the
    spec stays hashable and compares equal however it was made."""
    _one_of("dtype", spec.dtype, DTYPES)
    _one_of("layout", spec.layout, LAYOUTS)
    mean, std = tuple(float(v) for v in spec.mean), tuple(float(v) for v in spec.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean {mean} and std {std} must hold 3 values (RGB), std > 0")
    object.__setattr__(spec, "mean", mean)  # frozen dataclass: set once, while it is being made
    object.__setattr__(spec, "std", std)


@dataclass(frozen=True)
class TrainInput:
    """Training batches: `batch_size` per rank, in `sampling` order from `seed`, `samples_per_epoch` over all
    ranks (None = the data set's size), augmented by `aug`, cropped to `crop.at(epoch)`, normalised with
    `mean`/`std` (RGB, 0-255 scale), of `dtype` in `layout`, produced as `runtime` says."""

    batch_size: int
    crop: CropSchedule
    aug: AugmentSpec = field(default_factory=AugmentSpec)
    seed: int = 0
    sampling: str = "class_aware"
    samples_per_epoch: int | None = None
    dtype: str = "float16"
    layout: str = "NCHW"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        _one_of("sampling", self.sampling, SAMPLINGS)
        _check_output(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    def crop_size(self, epoch: int) -> int:
        """The output side of `epoch`'s batches."""
        return self.crop.at(epoch)

    def with_runtime(self, **changes: Any) -> TrainInput:
        """The same batches produced another way (threads, workers, prefetch, device)."""
        return replace(self, runtime=replace(self.runtime, **changes))


@dataclass(frozen=True)
class EvalInput:
    """Eval batches: the short side resized to crop_size / crop_ratio (antialiased), then the centre crop (or
    the four corners, the centre and their mirrors with `ten_crop`), normalised like `TrainInput`."""

    batch_size: int
    crop_size: int
    crop_ratio: float = 0.875
    ten_crop: bool = False
    dtype: str = "float32"
    layout: str = "NCHW"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        _check_output(self)
        if self.batch_size < 1 or self.crop_size < 1:
            raise ValueError(f"batch_size={self.batch_size} and crop_size={self.crop_size} must be >= 1")
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio={self.crop_ratio} is invalid; use a value in (0, 1], e.g. 0.875")

    @property
    def resize_shorter(self) -> int:
        """The short side before the crop."""
        return round(self.crop_size / self.crop_ratio)

    def with_runtime(self, **changes: Any) -> EvalInput:
        return replace(self, runtime=replace(self.runtime, **changes))
