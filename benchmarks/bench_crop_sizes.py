"""Input throughput per training crop size, and what changing the size costs: a section for RESULTS_tta.md.

    python benchmarks/bench_crop_sizes.py [--data DIR] [--images 1024] [--sizes 128,160,192,224] [--rounds 3]
                                          [--batch-size 64] [--batches 12] [--json F]

Writes (once) a tree of ImageNet-like JPEGs (500x375, quality 90: gpu_check's generator), then, in
interleaved rounds (every size once per round, in a rotated order, so a slow phase of a shared
machine falls on all of them alike):

1. `bench-input`'s `full` stage at each size: the TrainLoader exactly as training iterates it, with
   the default training input (training's config defaults: fp16 NCHW, class-aware, flip, rotation,
   colour jitter), on this process's CPU share;
2. the training graph alone (no colour pass, no copy) at each size two ways: the output side as the
   per-sample argument the training graph takes (`pipeline.dali.train_pipeline`), and the same graph
   with the side fixed when the graph is built (the alternative: a graph per size, rebuilt at a size
   change);
3. the price of that rebuild: seconds from asking a loader for another epoch's pipeline to its first
   batch (`InputTimes.startup_s`: the build, the Python workers' start, the queues filling).

Never asserts: the numbers go to benchmarks/RESULTS_tta.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from benchmarks.bench_input import cpu_model  # noqa: E402
from benchmarks.gpu_sections import photo_tree  # noqa: E402
from pipeline.bench import BenchSpec, images_per_second, measure_stage  # noqa: E402
from pipeline.dali import (TrainSource, decode_region, decoder_options, pipeline_args, source_args,  # noqa: E402
                           train_pipeline, unpack_params)
from pipeline.datasets import index_train  # noqa: E402
from pipeline.input_spec import Runtime  # noqa: E402
from pipeline.loader import TrainLoader  # noqa: E402
from pipeline.processes import DaliProcesses  # noqa: E402
from pipeline.sampling import ClassAwareSampler  # noqa: E402
from training.config import load_config  # noqa: E402
from training.inputs import train_input  # noqa: E402
from training.placement import place_run  # noqa: E402
from training.ranks import DistInfo  # noqa: E402


@pipeline_def(enable_conditionals=True)
def fixed_size_graph(source: TrainSource, runtime: Runtime, side: int):
    """`train_pipeline` with the warp's output side fixed when the graph is built (the rebuild-per-size design)."""
    jpegs, params, ids = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                            **source_args(runtime))
    p = unpack_params(params)
    images = decode_region(jpegs, p, decoder_options(runtime.device, runtime.threads, runtime.hw_decoder_load))
    if p["prescale"]:
        images = fn.resize(images, size=p["pre_size"], antialias=True)
    images = fn.warp_affine(images, matrix=p["matrix"], size=[side, side], dtype=types.FLOAT)
    return images, ids[0], p["colour"], ids


def graph_rate(index: Any, spec: BenchSpec, fixed: bool) -> float:
    """Images/s of the training graph alone (per-sample or fixed output side), DALI outputs only."""
    s = spec.input
    source = TrainSource(str(index.root), index.files, index.labels, (ClassAwareSampler(index.labels, 1, 0, s.seed),), s,
                         0, 0, samples=index.samples)
    args = pipeline_args(s.batch_size, s.runtime)
    pipe = (fixed_size_graph(source=source, runtime=s.runtime, side=s.crop_size(0), **args) if fixed
            else train_pipeline(source=source, runtime=s.runtime, **args))
    run = DaliProcesses(pipe, s.runtime.py_workers)
    del pipe

    def batches():
        while True:
            try:
                yield run.run()
            except StopIteration:
                run.reset()
    try:
        return images_per_second(batches(), spec.batches, spec.warmup, s.batch_size).images_per_s
    finally:
        run.close()


def rebuild_s(index: Any, spec: BenchSpec) -> float:
    """Seconds from asking for another epoch's pipeline to its first batch (what a rebuild per size costs)."""
    with TrainLoader(index, spec.input) as loader:
        next(iter(loader))
        loader.set_epoch(1)
        loader.take_timings()
        next(iter(loader))  # a new pipeline: built, workers started, queues filled
        return loader.take_timings().startup_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/senet-bench-sizes")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--sizes", default="128,160,192,224")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    index = index_train(photo_tree(Path(args.data), args.images, args.classes))
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = load_config(None, ["train.device=cpu", f"train.batch_size={args.batch_size}"])
    here = place_run(cfg, DistInfo())
    base = BenchSpec(input=train_input(cfg, here), batches=args.batches, warmup=args.warmup)
    kinds = ("full", "graph_per_sample", "graph_fixed")
    runs: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in kinds}
    rebuilds: list[float] = []
    before = list(os.getloadavg())
    started = time.monotonic()
    for r in range(args.rounds):
        for size in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            spec = base.at_size(size)
            order = kinds[r % 3:] + kinds[:r % 3]
            for kind in order:
                rate = (measure_stage(index, "full", spec).images_per_s if kind == "full"
                        else graph_rate(index, spec, fixed=kind == "graph_fixed"))
                runs[kind][size].append(rate)
            print(f"round {r + 1}, {size} px: " + ", ".join(f"{k} {runs[k][size][-1]:,.0f}" for k in kinds)
                  + f" img/s (load {os.getloadavg()[0]:.1f})", flush=True)
        rebuilds.append(rebuild_s(index, base.at_size(sizes[-1])))
    after = list(os.getloadavg())
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs visible", "placement": here.describe(),
              "load_before": before, "load_after": after, "seconds": time.monotonic() - started,
              "images": len(index), "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
              "runs": {k: {str(s): v for s, v in d.items()} for k, d in runs.items()}, "rebuild_s": rebuilds}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(f"Machine: {result['machine']}; {here.describe()}; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.1f}' for v in before)} before, {'/'.join(f'{v:.1f}' for v in after)} after.")
    print()
    print("| crop side | full stage, images/s (median; runs) | x of the largest | graph, per-sample side | graph, "
          "fixed side | per-sample / fixed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    largest = statistics.median(runs["full"][max(sizes)])
    for s in sizes:
        full, per, fixed = (statistics.median(runs[k][s]) for k in kinds)
        ratios = [a / b for a, b in zip(runs["graph_per_sample"][s], runs["graph_fixed"][s])]
        print(f"| {s} | {full:,.0f} ({', '.join(f'{v:,.0f}' for v in runs['full'][s])}) | {full / largest:.2f} | "
              f"{per:,.0f} | {fixed:,.0f} | {statistics.median(ratios):.2f} |")
    print()
    print(f"A rebuilt pipeline's first batch: {', '.join(f'{v:.2f}' for v in rebuilds)} s (median "
          f"{statistics.median(rebuilds):.2f} s).")


if __name__ == "__main__":
    main()
