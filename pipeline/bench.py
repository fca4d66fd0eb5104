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
The baseline is the same full augmentation done the torchvision way: a torch DataLoader whose
workers (as many as DALI has threads) decode with PIL and crop-resize, flip, rotate, jitter
brightness/contrast/saturation(/hue) with PIL, then normalise with numpy to the same dtype/layout.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import logging

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, draw
from pipeline.dali import TrainSource, decoder_options, image_size
from pipeline.datasets import ImageIndex
from pipeline.loader import TrainLoader
from pipeline.sampling import ClassAwareSampler

STAGES = ("read", "decode", "crop_flip", "full")
# Not run by default: the textbook graph (crop, resize, then rotate, color_twist, crop_mirror_normalize
# as separate passes), to show what the engineered `full` graph saves.
EXTRA_STAGES = ("naive",)

log = logging.getLogger("senet.bench")


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: batches after warm-up batches, on 'cpu' or 'gpu'."""

    device: str = "cpu"
    batch_size: int = 64
    threads: int = 2
    py_workers: int = 2
    batches: int = 100
    warmup: int = 5
    crop_size: int = 224
    dtype: str = "float16"
    layout: str = "NCHW"
    seed: int = 0


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
            try:
                fields = open(f"/proc/{entry.name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    mine, total = {os.getpid()}, 0.0
    for _ in range(8):  # grow the family tree a generation at a time
        mine |= {pid for pid, (ppid, _) in stats.items() if ppid in mine}
    return sum(stats[pid][1] for pid in mine if pid in stats)


def images_per_second(batches: Iterable[Any], count: int, warmup: int, batch_size: int, sync: bool = False) -> Rate:
    """Images per second over `count` batches of an iterable, after `warmup` batches."""
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


class _CropFlipSource:
    """TrainSource's bytes, crop region and flip, for the crop_flip stage (no rotation, no colour)."""

    def __init__(self, inner: TrainSource) -> None:
        self.inner = inner

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        out = dict(zip(self.inner.outputs, self.inner(info)))
        return out["jpeg"], out["anchor"], out["shape"], np.array(out["matrix"][0, 0] < 0, dtype=np.int32)


class _NaiveSource:
    """TrainSource's crop region plus flip, angle and colour factors for the naive graph's own ops."""

    def __init__(self, inner: TrainSource, aug: AugmentSpec) -> None:
        self.inner, self.aug = inner, aug

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        out = dict(zip(self.inner.outputs, self.inner(info)))
        size = image_size(out["jpeg"].tobytes())
        d = draw(self.aug, self.inner.seed, self.inner.first_epoch + info.epoch_idx, int(out["position"][0]), *size)
        scalars = (d.angle, d.brightness, d.contrast, d.saturation, d.hue * 360.0)
        return (out["jpeg"], out["anchor"], out["shape"], np.array(out["matrix"][0, 0] < 0, dtype=np.int32),
                *(np.array(v, dtype=np.float32) for v in scalars))


@pipeline_def
def stage_pipeline(source: Any, stage: str, decoder: dict[str, Any], crop_size: int, dtype: str, layout: str,
                   parallel: bool):
    """The graph of one bench stage (read, decode or crop_flip)."""
    if stage == "read":
        return tuple(fn.external_source(source=source, num_outputs=len(source.outputs), batch=False, parallel=parallel))
    if stage == "naive":
        jpegs, anchor, shape, mirror, angle, brightness, contrast, saturation, hue = fn.external_source(
            source=_NaiveSource(source, AugmentSpec()), num_outputs=9, batch=False, parallel=parallel)
        images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", output_type=types.RGB,
                                         adjust_orientation=False, **decoder)
        images = fn.resize(images, size=[crop_size, crop_size])
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0)
        images = fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
                                        output_layout="CHW" if layout == "NCHW" else "HWC", mean=list(IMAGENET_MEAN),
                                        std=list(IMAGENET_STD))
    jpegs, anchor, shape, mirror = fn.external_source(source=_CropFlipSource(source), num_outputs=4, batch=False,
                                                      parallel=parallel)
    if stage == "decode":
        return fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decoder)
    images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", output_type=types.RGB,
                                     adjust_orientation=False, **decoder)
    images = fn.resize(images, size=[crop_size, crop_size])
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
                                    output_layout="CHW" if layout == "NCHW" else "HWC", mean=list(IMAGENET_MEAN),
                                    std=list(IMAGENET_STD))


def _endless(pipe: Any) -> Iterable[Any]:
    pipe.build()
    while True:
        try:
            yield pipe.run()
        except StopIteration:
            pipe.reset()


@contextlib.contextmanager
def stage_batches(index: ImageIndex, stage: str, spec: BenchSpec, aug: AugmentSpec = AugmentSpec()) -> Iterator[Iterator[Any]]:
    """An endless iterator of one stage's batches (see the module docstring); closed on exit."""
    if stage == "full":
        with TrainLoader(index, batch_size=spec.batch_size, rank=0, world_size=1, local_rank=0, device=spec.device,
                         seed=spec.seed, sampling="class_aware", samples_per_epoch=None, aug=aug,
                         crop_size=spec.crop_size, dtype=spec.dtype, layout=spec.layout, threads=spec.threads,
                         py_workers=spec.py_workers, prefetch=2) as loader:
            yield iter(_epochs(loader))
        return
    sampler = ClassAwareSampler(index.labels, 1, 0, spec.seed)
    flat = replace(aug, rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    source = TrainSource(str(index.root), index.files, index.labels, sampler, flat, spec.crop_size, spec.seed, 0, 0,
                         spec.batch_size)
    pipe = stage_pipeline(source=source, stage=stage, decoder=decoder_options(spec.device, 0),
                          crop_size=spec.crop_size, dtype=spec.dtype, layout=spec.layout, parallel=spec.py_workers > 0,
                          batch_size=spec.batch_size, num_threads=spec.threads, prefetch_queue_depth=2,
                          device_id=0 if spec.device == "gpu" else None, py_num_workers=max(1, spec.py_workers))
    try:
        yield iter(_endless(pipe))
    finally:
        del pipe


def measure_stage(index: ImageIndex, stage: str, spec: BenchSpec, aug: AugmentSpec = AugmentSpec()) -> Rate:
    """Images per second of one stage (see the module docstring)."""
    with stage_batches(index, stage, spec, aug) as batches:
        return images_per_second(batches, spec.batches, spec.warmup, spec.batch_size, sync=spec.device == "gpu")


def _epochs(loader: TrainLoader) -> Iterable[Any]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------- PIL baseline
class PILTrainSet(torch.utils.data.Dataset):
    """The full augmentation done the torchvision way with PIL and numpy (for the baseline)."""

    def __init__(self, index: ImageIndex, aug: AugmentSpec, crop_size: int, dtype: str, layout: str, seed: int) -> None:
        self.index, self.aug, self.size, self.seed = index, aug, crop_size, seed
        self.dtype, self.layout = np.dtype(dtype), layout
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.inv_std = 1 / np.asarray(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageEnhance

        try:
            img = Image.open(self.index.path(i)).convert("RGB")
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
def baseline_batches(index: ImageIndex, spec: BenchSpec, aug: AugmentSpec = AugmentSpec()) -> Iterator[Iterator[Any]]:
    """An endless iterator of the PIL DataLoader's batches: spec.threads workers, class-aware sampling."""
    sampler = ClassAwareSampler(index.labels, 1, 0, spec.seed)
    data = PILTrainSet(index, aug, spec.crop_size, spec.dtype, spec.layout, spec.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=spec.batch_size, sampler=sampler, num_workers=spec.threads,
                                         drop_last=True, persistent_workers=True, prefetch_factor=2,
                                         pin_memory=spec.device == "gpu")

    def epochs() -> Iterator[Any]:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for images, labels in loader:
                if spec.device == "gpu":
                    images, labels = images.cuda(non_blocking=True), labels.cuda(non_blocking=True)
                yield images, labels
            epoch += 1

    batches = epochs()
    try:
        yield batches
    finally:
        batches.close()
        del loader  # persistent workers stop with the loader's iterator


def measure_baseline(index: ImageIndex, spec: BenchSpec, aug: AugmentSpec = AugmentSpec()) -> Rate:
    """Images per second of the PIL DataLoader with spec.threads workers and class-aware sampling."""
    with baseline_batches(index, spec, aug) as batches:
        return images_per_second(batches, spec.batches, spec.warmup, spec.batch_size, sync=spec.device == "gpu")


def run_bench(index: ImageIndex, spec: BenchSpec, stages: Iterable[str] = STAGES, baseline: bool = False,
              aug: AugmentSpec = AugmentSpec()) -> dict[str, Any]:
    """All requested measurements, as `senet bench-input --json` writes them."""
    result: dict[str, Any] = {"device": spec.device, "threads": spec.threads, "batch_size": spec.batch_size,
                              "py_workers": spec.py_workers, "batches": spec.batches, "crop_size": spec.crop_size,
                              "dtype": spec.dtype, "layout": spec.layout, "images": len(index), "stages": {},
                              "baseline": {}, "cpu_ms_per_image": {}}
    for stage in stages:
        rate = measure_stage(index, stage, spec, aug)
        result["stages"][stage] = rate.images_per_s
        result["cpu_ms_per_image"][stage] = rate.cpu_ms_per_image
    if baseline:
        rate = measure_baseline(index, spec, aug)
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
