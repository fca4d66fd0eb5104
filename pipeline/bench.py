"""Input throughput, stage by stage (`senet bench-input`), and the PIL DataLoader baseline.

Stages, each timed over the same class-aware sample order after a warm-up:
  read       the Python source alone: file bytes, byte screen, header size, augmentation draws
  decode     + decoding whole images
  crop_flip  + decoding only the random-size crop, resize to the crop size, flip, normalise (DALI's
             own cheap augmentation: the reference the full graph is held to)
  full       the TrainLoader exactly as training iterates it: rotation, colour jitter, fp16/NCHW,
             class-aware sampling, the copy into torch tensors
  naive      (only on request) the same augmentation as separate DALI passes: decode the crop,
             resize, rotate, color_twist, crop_mirror_normalize
  decode_region  (only on request) + decoding only each sample's random-size crop region, nothing
             after it: the training graph's decoder (image_slice) beside `decode`'s whole images
The baseline is the same full augmentation done the torchvision way: a torch DataLoader whose
workers (as many as DALI has threads) decode with PIL and crop-resize, flip, rotate, jitter
brightness/contrast/saturation(/hue) with PIL, then normalise with numpy to the same dtype/layout.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import AugmentSpec, draw, draws
from pipeline.dali import (PARAMS, TrainSource, decode_region, decoder_options, normalize, pipeline_args, source_args,
                           unpack_params)
from pipeline.datasets import ImageIndex
from pipeline.input_spec import CropSchedule, Runtime, TrainInput
from pipeline.loader import TrainLoader, endless
from pipeline.processes import DaliProcesses, proc_stat
from pipeline.sampling import ClassAwareSampler

STAGES = ("read", "decode", "crop_flip", "full")
# Not run by default: the textbook graph (crop, resize, then rotate, color_twist, crop_mirror_normalize
# as separate passes), to show what the engineered `full` graph saves.
EXTRA_STAGES = ("naive", "decode_region")

log = logging.getLogger("senet.bench")


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: `batches` after `warmup` batches of the training input `input` (its epoch-0 size;
    `at_size` gives another), produced as its runtime says."""

    input: TrainInput
    batches: int = 100
    warmup: int = 5

    @property
    def batch_size(self) -> int:
        return self.input.batch_size

    @property
    def runtime(self) -> Runtime:
        return self.input.runtime

    @property
    def crop_size(self) -> int:
        return self.input.crop_size(0)

    def at_size(self, crop_size: int) -> BenchSpec:
        """The same measurement with every batch at `crop_size`."""
        return replace(self, input=replace(self.input, crop=CropSchedule(crop_size)))

    def with_runtime(self, **changes: Any) -> BenchSpec:
        return replace(self, input=self.input.with_runtime(**changes))


@dataclass(frozen=True)
class Rate:
    """A measurement: images per second (wall clock) and CPU milliseconds spent per image by this
    process and its children (workers), which other processes' load on a shared machine barely moves."""

    images_per_s: float
    cpu_ms_per_image: float


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(entry.name)
            if fields is not None:
                stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    mine = {os.getpid()}
    for _ in range(8):  # grow the family tree a generation at a time
        mine |= {pid for pid, (ppid, _) in stats.items() if ppid in mine}
    return sum(stats[pid][1] for pid in mine if pid in stats)


def images_per_second(batches: Iterable[Any], count: int, warmup: int, batch_size: int, sync: bool = False) -> Rate:
    """Images per second over `count` batches of an iterable, after `warmup` batches.

    With `sync`, the device is synchronised before the clock starts and before it stops: every
    stream of this process, DALI's included, so work still in flight is counted.
    """
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if sync:
        torch.cuda.synchronize()
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(count):
        next(it)
    if sync:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return Rate(count * batch_size / wall, 1000 * cpu / (count * batch_size))


class NaiveSource:
    """TrainSource's batches plus each sample's angle and colour factors, for the naive graph's own ops."""

    def __init__(self, inner: TrainSource, aug: AugmentSpec) -> None:
        self.inner, self.aug = inner, aug

    def __call__(self, info: Any) -> tuple[Any, ...]:
        jpegs, params, ids = self.inner(info)
        size = params[:, PARAMS["size"][0]:PARAMS["size"][1]].astype(np.int64)
        d = draws(self.aug, self.inner.seed, self.inner.first_epoch + info.epoch_idx, ids[:, 2], size[:, 0], size[:, 1])
        factors = np.stack([d.angle, d.brightness, d.contrast, d.saturation, d.hue * 360.0], axis=1).astype(np.float32)
        return jpegs, params, factors


@pipeline_def
def stage_pipeline(source: Any, stage: str, spec: TrainInput):
    """The graph of one bench stage (read, decode, decode_region, crop_flip or naive), at the epoch-0 size."""
    rt, crop_size, dtype, layout = spec.runtime, spec.crop_size(0), spec.dtype, spec.layout
    decoder = decoder_options(rt.device, rt.threads, rt.hw_decoder_load)
    if stage == "read":
        return tuple(fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True, **source_args(rt)))
    if stage == "naive":
        jpegs, params, factors = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                    **source_args(rt))
        p = unpack_params(params)
        images = fn.resize(decode_region(jpegs, p, decoder), size=[crop_size, crop_size])
        images = fn.rotate(images, angle=factors[0], keep_size=True, fill_value=0)
        images = fn.color_twist(images, brightness=factors[1], contrast=factors[2], saturation=factors[3],
                                hue=factors[4])
        return normalize(images, dtype, layout, mirror=p["mirror"])
    # Every source output stays a pipeline output: DALI 2.4 hangs on a parallel batch source whose outputs
    # it has pruned.
    jpegs, params, ids = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                            **source_args(rt))
    if stage == "decode":
        return fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decoder), params, ids
    p = unpack_params(params)
    if stage == "decode_region":
        return decode_region(jpegs, p, decoder), ids
    images = fn.resize(decode_region(jpegs, p, decoder), size=[crop_size, crop_size])
    return normalize(images, dtype, layout, mirror=p["mirror"]), ids


def _endless(run: DaliProcesses) -> Iterable[Any]:
    while True:
        try:
            yield run.run()
        except StopIteration:
            run.reset()


@contextlib.contextmanager
def stage_batches(index: ImageIndex, stage: str, spec: BenchSpec) -> Iterator[Iterator[Any]]:
    """An endless iterator of one stage's batches (see the module docstring); closed on exit.

    Python workers start before the pipeline is built; once an earlier stage has initialised the CUDA
    driver they are spawned (`pipeline.processes.start_method`).
    """
    if stage == "full":
        with TrainLoader(index, spec.input) as loader:
            yield endless(loader)
        return
    sampler = ClassAwareSampler(index.labels, 1, 0, spec.input.seed)
    # The crop region and flip only (the same boxes as `full`: rotation and colour draw other uniforms).
    flat = replace(spec.input.aug, rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    source: Any = TrainSource(str(index.root), index.files, index.labels, (sampler,), replace(spec.input, aug=flat), 0, 0,
                              samples=index.samples)
    if stage == "naive":
        source = NaiveSource(source, spec.input.aug)
    pipe = stage_pipeline(source=source, stage=stage, spec=spec.input, **pipeline_args(spec.batch_size, spec.runtime))
    run = DaliProcesses(pipe, spec.runtime.py_workers)
    del pipe  # the DaliProcesses owns it
    try:
        yield iter(_endless(run))
    finally:
        run.close()


def measure_stage(index: ImageIndex, stage: str, spec: BenchSpec) -> Rate:
    """Images per second of one stage (see the module docstring)."""
    with stage_batches(index, stage, spec) as batches:
        return images_per_second(batches, spec.batches, spec.warmup, spec.batch_size, sync=spec.runtime.device == "gpu")


# ------------------------------------------------------------------------------- PIL baseline
class PILTrainSet(torch.utils.data.Dataset):
    """The full augmentation of a training spec done the torchvision way with PIL and numpy (for the baseline)."""

    def __init__(self, index: ImageIndex, spec: TrainInput) -> None:
        self.index, self.aug, self.size, self.seed = index, spec.aug, spec.crop_size(0), spec.seed
        self.dtype, self.layout = np.dtype(spec.dtype), spec.layout
        self.mean = np.asarray(spec.mean, np.float32)
        self.inv_std = 1 / np.asarray(spec.std, np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageEnhance

        try:
            img = Image.open(io.BytesIO(self.index.read(i))).convert("RGB")
        except OSError:  # an undecodable file not on the exclusion list: a blank image keeps the timing going
            log.warning("baseline: cannot decode %s; timing a blank image instead", self.index.path(i))
            img = Image.new("RGB", (self.size, self.size))
        d = draw(self.aug, self.seed, 0, i, *img.size)
        # RandomResizedCrop: crop + resize in one PIL call (torchvision's F.resized_crop does the same)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(d.x, d.y, d.x + d.w, d.y + d.h))
        if d.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.aug.rotation:
            img = img.rotate(d.angle, Image.BILINEAR)
        # ColorJitter (fixed order here; torchvision shuffles it)
        for on, enhancer, factor in ((self.aug.brightness, ImageEnhance.Brightness, d.brightness),
                                     (self.aug.contrast, ImageEnhance.Contrast, d.contrast),
                                     (self.aug.saturation, ImageEnhance.Color, d.saturation)):
            if on:
                img = enhancer(img).enhance(factor)
        if self.aug.hue:  # torchvision's adjust_hue: shift H in PIL's HSV
            h, s, v = img.convert("HSV").split()
            h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(round(d.hue * 255) % 256)).astype(np.uint8), "L")
            img = Image.merge("HSV", (h, s, v)).convert("RGB")
        x = (np.asarray(img, np.float32) - self.mean) * self.inv_std  # ToTensor + Normalize on the 0-255 scale
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype)), int(self.index.labels[i])


@contextlib.contextmanager
def baseline_batches(index: ImageIndex, spec: BenchSpec) -> Iterator[Iterator[Any]]:
    """An endless iterator of the PIL DataLoader's batches: as many workers as DALI threads, class-aware sampling."""
    rt = spec.runtime
    sampler = ClassAwareSampler(index.labels, 1, 0, spec.input.seed)
    loader = torch.utils.data.DataLoader(PILTrainSet(index, spec.input), batch_size=spec.batch_size, sampler=sampler,
                                         num_workers=rt.threads, drop_last=True, persistent_workers=True,
                                         prefetch_factor=2, pin_memory=rt.device == "gpu")

    device = torch.device("cuda", rt.device_id or 0) if rt.device == "gpu" else None
    batches = endless(_EpochsOf(loader, sampler, device))
    try:
        yield batches
    finally:
        batches.close()
        del loader  # persistent workers stop with the loader's iterator


class _EpochsOf:
    """A torch DataLoader behind the loaders' `set_epoch` / iterate interface, batches moved to `device`."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: ClassAwareSampler, device: torch.device | None):
        self.loader, self.sampler, self.device = loader, sampler, device

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            if self.device is not None:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            yield images, labels


def measure_baseline(index: ImageIndex, spec: BenchSpec) -> Rate:
    """Images per second of the PIL DataLoader with as many workers as DALI threads and class-aware sampling."""
    with baseline_batches(index, spec) as batches:
        return images_per_second(batches, spec.batches, spec.warmup, spec.batch_size, sync=spec.runtime.device == "gpu")


def run_bench(index: ImageIndex, spec: BenchSpec, stages: Iterable[str] = STAGES, baseline: bool = False) -> dict[str, Any]:
    """All requested measurements at the spec's epoch-0 crop size, as `senet bench-input --json` writes them."""
    rt = spec.runtime
    result: dict[str, Any] = {"device": rt.device, "hw_decoder_load": rt.hw_decoder_load, "threads": rt.threads,
                              "batch_size": spec.batch_size, "py_workers": rt.py_workers, "prefetch": rt.prefetch,
                              "batches": spec.batches, "crop_size": spec.crop_size, "dtype": spec.input.dtype,
                              "layout": spec.input.layout, "images": len(index), "stages": {}, "baseline": {},
                              "cpu_ms_per_image": {}}
    for stage in stages:
        rate = measure_stage(index, stage, spec)
        result["stages"][stage] = rate.images_per_s
        result["cpu_ms_per_image"][stage] = rate.cpu_ms_per_image
    if baseline:
        rate = measure_baseline(index, spec)
        result["baseline"]["full"] = rate.images_per_s
        result["cpu_ms_per_image"]["baseline"] = rate.cpu_ms_per_image
    stages_done = result["stages"]
    ratios = {}
    if "full" in stages_done and "crop_flip" in stages_done:
        ratios["full_vs_crop_flip"] = stages_done["full"] / stages_done["crop_flip"]
    if "full" in stages_done and result["baseline"]:
        ratios["full_vs_baseline"] = stages_done["full"] / result["baseline"]["full"]
    result["ratios"] = ratios
    return result


def plot(result: dict[str, Any], path: str) -> None:
    """A horizontal bar chart of images/s per stage, the baseline in another colour, ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["stages"]) + [f"baseline (PIL) {k}" for k in result["baseline"]]
    values = list(result["stages"].values()) + list(result["baseline"].values())
    colours = ["tab:blue" if k == "full" else "lightsteelblue" for k in result["stages"]]  # full: the headline
    colours += ["tab:gray"] * len(result["baseline"])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4))
    bars = ax.barh(names[::-1], values[::-1], color=colours[::-1])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[::-1]], padding=3)
    ax.set_xlabel("images / s (higher is better)")
    ratio = "  ".join(f"{k.replace('_', ' ')}: {v:.2f}x" for k, v in result.get("ratios", {}).items())
    ax.set_title(f"input pipeline, {result['device']}, {result['threads']} threads, batch {result['batch_size']}"
                 + (f"\n{ratio}" if ratio else ""), fontsize=10)
    ax.set_xlim(0, max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
