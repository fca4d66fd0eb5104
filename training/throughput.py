"""`senet bench-train`: step time with real DALI batches against a synthetic batch resident on the device,
and which of the two sets the pace.

The data-stall fraction is ``1 - synthetic / real`` step time: the share of a real step that the input
pipeline adds (the GPU waiting for data, or the host busy feeding it). Both loops are the engine's own
`train_step` on the same run, built by `training.build.build` (one process); the synthetic side is a
`pipeline.loader.ResidentLoader` holding the first real batch, so it costs nothing to produce.

The bound is named from the real run's own waits, read as the training stall alarm reads a log window
(`training.stall.bound_verdict`): input-bound (with where the loader's time went and the setting to try)
when they exceed `train.data_wait_warn`, else compute-bound. On a CPU the input and the model share the
cores, so the two step times are never added or compared as standalone rates to decide it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipeline.loader import ResidentLoader, endless
from training.build import Run, build, load_data
from training.config import Config, batch_layout, runs_channels_last
from training.ranks import DistInfo
from training.engine import prepare_batch, train_step
from training.placement import place_run
from training.stall import InputContext, RankWindow, bound_verdict, node_name


def bench_train(cfg: Config, batches: int, warmup: int = 3) -> dict[str, Any]:
    """Real vs synthetic images/s of `cfg`'s model on this process's device (see the module docstring).

    Returns:
        arch, device, precision, batch_size, channels_last, layout, compile, batches, crop_size,
        real/synthetic step_s and images_per_s, data_stall_fraction, data_wait_fraction (time blocked
        in the loader), bound ('input' or 'compute'), verdict (one line), knob (the setting to try first,
        '' when compute-bound), input_times (the loader's host seconds per batch, by stage),
        max_memory_gib (GPU) and the placement.
    """
    place = place_run(cfg, DistInfo())  # one process, whatever launched us
    layout = batch_layout(cfg, place.device)
    data = load_data(cfg)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        r = build(cfg, place, Path(out), data=replace(data, val=None))
        try:
            for group in r.optimizer.param_groups:
                group["lr"] = r.schedule.peak
            r.train_model.train()
            if r.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(r.device)
            measured_size = r.train_loader.crop_size  # the first epoch's: with progressive resizing, not the final one
            real = endless(r.train_loader)
            first = next(real)
            images, labels = prepare_batch(*first, r.precision, layout)
            resident = ResidentLoader(images.clone(), labels.clone(), cfg.train.batch_size)
            real_s, waits = time_steps(r, _chain(first, real), batches, warmup, layout,
                                       at_start=r.train_loader.take_timings)  # the warm-up's timings dropped
            times = r.train_loader.take_timings()
            synthetic_s, _ = time_steps(r, endless(resident), batches, warmup, "NCHW")  # already the model's input
            peak = torch.cuda.max_memory_allocated(r.device) / 2**30 if r.device.type == "cuda" else None
        finally:
            r.close()
    b = cfg.train.batch_size
    window = RankWindow.measured(0, node_name(), waits, real_s * batches, times)
    verdict = bound_verdict(real_s, synthetic_s, window, InputContext.of(cfg, place), cfg.train.data_wait_warn)
    per_batch = {k: getattr(times, k) / max(1, times.batches) for k in ("read_s", "graph_s", "copy_s", "colour_s")}
    return {"arch": cfg.model.arch, "device": place.device, "precision": place.precision.name, "batch_size": b,
            "channels_last": runs_channels_last(cfg, place.device), "layout": layout,
            "compile": cfg.train.compile, "batches": batches, "crop_size": measured_size, "real_step_s": real_s,
            "synthetic_step_s": synthetic_s, "real_images_per_s": b / real_s, "synthetic_images_per_s": b / synthetic_s,
            "data_stall_fraction": max(0.0, 1.0 - synthetic_s / real_s), "data_wait_fraction": window.fraction,
            "bound": verdict["bound"], "verdict": verdict["text"], "knob": verdict["knob"], "input_times": per_batch,
            "max_memory_gib": peak, "placement": place.describe()}


def time_steps(r: Run, batches: Iterator[Any], count: int, warmup: int, layout: str,
               at_start: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
    """Seconds per step over `count` engine steps after `warmup` ones, and each timed step's wait in `next`.

    `at_start` is called when the timed steps begin (after the warm-up's device work has finished).
    """
    sync = torch.cuda.synchronize if r.device.type == "cuda" else (lambda: None)
    waits: list[float] = []
    start = 0.0
    for n in range(warmup + count):
        if n == warmup:
            sync()
            if at_start is not None:
                at_start()
            start, waits = time.perf_counter(), []
        t0 = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - t0)
        images, labels = prepare_batch(*batch, r.precision, layout)
        train_step(r.train_model, images, labels, r.optimizer, r.scaler, r.precision, r.cfg.optim.label_smoothing)
        if r.ema is not None:  # a weight EMA's update is part of a training step's time
            r.ema.update(n + 1)
        r.stragglers.step_done()  # the test hook's injected slow-down (SENET_TEST_SLOW_RANK), as in training
    sync()
    return (time.perf_counter() - start) / count, waits


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
