"""Input pipeline throughput on ImageNet-like JPEGs: DALI stages vs the PIL DataLoader baseline.

    python benchmarks/bench_input.py [--data DIR] [--rounds 3] [--batches 100] [--threads 2] [--json F]

Writes (once) a tree of ~500x375 quality-90 JPEGs (pipeline.synthetic's renderer, 80 % landscape,
20 % portrait, as ImageNet), then measures each stage ROUNDS times, interleaved (read, decode,
crop_flip, full, baseline, read, ...), so that load from other processes on a shared machine hits
all of them alike; it reports the median of each and the ratios computed within each round.
Never asserts: the numbers go to benchmarks/RESULTS_input.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.bench import (STAGES, BenchSpec, baseline_batches, images_per_second, measure_baseline, measure_stage,
                            stage_batches)
from pipeline.datasets import index_train
from pipeline.synthetic import JPEG_QUALITY, MAX_CLASSES, class_looks, encode, render
from training.config import load_config
from training.inputs import train_input
from training.placement import place_run
from training.ranks import DistInfo

SIZES = ((500, 375), (375, 500))  # ImageNet's most common landscape and portrait shapes
PREFETCHED = 4  # batches a contender may hold ready when its turn comes (interleaved mode)


def _write_class(job: tuple[str, int, int, object]) -> None:
    folder, c, per_class, look = job
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for n in range(per_class):
        rng = np.random.default_rng((c, n))
        img = render(look, rng, 300, 400).resize(SIZES[int(rng.random() < 0.2)], Image.BILINEAR)
        (out / f"{out.name}_{n + 1}.JPEG").write_bytes(encode(img))  # quality JPEG_QUALITY


def make_imagenet_like(root: Path, classes: int, per_class: int) -> Path:
    """A folder of `classes` class folders with `per_class` ~500x375 JPEGs each (kept between runs)."""
    done = root / "done.txt"
    if done.exists():
        return root
    looks = class_looks(min(classes, MAX_CLASSES))  # throughput does not need distinct classes
    jobs = [(str(root / "train" / f"n{c:08d}"), c, per_class, looks[c % len(looks)]) for c in range(classes)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_class, jobs))
    done.write_text(f"{classes} classes x {per_class} images, quality {JPEG_QUALITY}\n")
    return root


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/senet-bench-input")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--py-workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--interleave", type=int, default=0, metavar="K",
                   help="keep crop_flip, full and the baseline open and time them in alternating chunks of K batches "
                        "(--batches in all per contender): pairs that saw the same load on a shared machine")
    p.add_argument("--json")
    args = p.parse_args()

    index = index_train(make_imagenet_like(Path(args.data), args.classes, args.per_class))
    cfg = load_config(None, [f"train.device={args.device}", f"train.batch_size={args.batch_size}",
                             f"data.threads={args.threads}", f"data.py_workers={args.py_workers}", "data.layout=NCHW"])
    spec = BenchSpec(input=train_input(cfg, place_run(cfg, DistInfo())), batches=args.batches)
    if args.interleave:
        interleaved(index, spec, args.interleave, args.json)
        return
    names = args.stages.split(",") + ([] if args.no_baseline else ["baseline"])
    runs: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            rate = measure_baseline(index, spec) if name == "baseline" else measure_stage(index, name, spec)
            runs[name].append(rate.images_per_s)
            cpu[name].append(rate.cpu_ms_per_image)
            print(f"round {r + 1}: {name:10s} {rate.images_per_s:8.0f} images/s  {rate.cpu_ms_per_image:6.2f} CPU ms/image "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    ratios: dict[str, list[float]] = {}
    if "full" in runs and "crop_flip" in runs:
        ratios["full / crop_flip"] = [f / c for f, c in zip(runs["full"], runs["crop_flip"])]
        ratios["CPU: crop_flip / full"] = [c / f for f, c in zip(cpu["full"], cpu["crop_flip"])]
    if "full" in runs and "baseline" in runs:
        ratios["full / baseline"] = [f / b for f, b in zip(runs["full"], runs["baseline"])]
        ratios["CPU: baseline / full"] = [b / f for f, b in zip(cpu["full"], cpu["baseline"])]
    result = {"machine": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "images": len(index),
              "spec": asdict(spec.input), "runs": runs, "cpu_ms_per_image": cpu, "ratios": ratios,
              "median": {k: statistics.median(v) for k, v in runs.items()},
              "median_cpu_ms_per_image": {k: statistics.median(v) for k, v in cpu.items()},
              "median_ratio": {k: statistics.median(v) for k, v in ratios.items()}}
    print(json.dumps({k: result[k] for k in ("machine", "median", "median_cpu_ms_per_image", "median_ratio")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def interleaved(index, spec: BenchSpec, chunk: int, json_path: str | None) -> None:
    """crop_flip, full and baseline alive together, timed in alternating chunks; ratios per cycle."""
    names = ("crop_flip", "full", "baseline")
    with contextlib.ExitStack() as stack:
        its = {n: stack.enter_context(baseline_batches(index, spec) if n == "baseline" else stage_batches(index, n, spec))
               for n in names}
        for it in its.values():  # warm-up: workers started, caches hot
            for _ in range(spec.warmup):
                next(it)
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        for cycle in range(-(-spec.batches // chunk)):
            for n in names:
                time.sleep(1.5)  # the contenders refill their prefetch queues now, not while another is timed
                # ... and those prefetched batches (DALI: 2, the DataLoader: 2 per worker) are not timed.
                rate = images_per_second(its[n], chunk, PREFETCHED, spec.batch_size)
                wall[n].append(chunk * spec.batch_size / rate.images_per_s)
                cpu[n].append(rate.cpu_ms_per_image)
            print(f"cycle {cycle + 1}: " + "  ".join(f"{n} {chunk * spec.batch_size / wall[n][-1]:5.0f} img/s "
                                                    f"{cpu[n][-1]:.2f} CPU ms" for n in names)
                  + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    images = len(wall["full"]) * chunk * spec.batch_size
    rate = {n: images / sum(wall[n]) for n in names}
    cpu_ms = {n: statistics.median(cpu[n]) for n in names}
    cycles = {"full / crop_flip": [c / f for f, c in zip(wall["full"], wall["crop_flip"])],
              "full / baseline": [b / f for f, b in zip(wall["full"], wall["baseline"])]}
    result = {"machine": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "images": len(index),
              "spec": asdict(spec.input),
              "chunk_batches": chunk, "batches_each": images // spec.batch_size, "images_per_s": rate,
              "cpu_ms_per_image": cpu_ms, "ratio": {"full / crop_flip": rate["full"] / rate["crop_flip"],
                                                    "full / baseline": rate["full"] / rate["baseline"]},
              "ratio_per_cycle": cycles,
              "ratio_cpu": {"crop_flip / full": cpu_ms["crop_flip"] / cpu_ms["full"],
                            "baseline / full": cpu_ms["baseline"] / cpu_ms["full"]}}
    print(json.dumps({k: result[k] for k in ("machine", "images_per_s", "cpu_ms_per_image", "ratio", "ratio_cpu")},
                     indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
