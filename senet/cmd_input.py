"""`senet` commands for the input pipeline: bench-input (per stage, or `--tune`), preview-augment."""
from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from senet.console import UsageError, add_exclusion_options, write_json
from training.config import DataConfig

if TYPE_CHECKING:
    from pipeline.tune import TuneResult

STAGE_BATCHES, TUNE_BATCHES = 100, 20  # timed batches of a stage; of one tuning run (a search makes dozens)


def _index(args: argparse.Namespace):
    """The training images of DATA less check-data's exclusion list (and --exclude), like training reads them."""
    from pipeline.datasets import index_train, load_exclusions

    index = index_train(args.data, args.cache_dir)
    return index.without(load_exclusions(args.data, args.cache_dir, args.exclude))


def cmd_bench_input(args: argparse.Namespace) -> int:
    from pipeline.bench import EXTRA_STAGES, STAGES, BenchSpec, plot, run_bench
    from pipeline.dali import HW_DECODER_LOAD
    from training.placement import place

    if args.batches is None:
        args.batches = TUNE_BATCHES if args.tune else STAGE_BATCHES
    if args.tune:
        return tune_input(args)
    args.py_workers = 0 if args.py_workers is None else args.py_workers
    args.prefetch = DataConfig().prefetch if args.prefetch is None else args.prefetch
    if args.batch_size < 1 or args.batches < 1 or (args.threads is not None and args.threads < 1) or args.prefetch < 1 \
            or args.py_workers < 0:
        raise UsageError(f"--batch-size {args.batch_size}, --batches {args.batches}, --threads {args.threads} and "
                         f"--prefetch {args.prefetch} must be >= 1, --py-workers {args.py_workers} >= 0")
    stages = args.stages.split(",") if args.stages else list(STAGES)
    unknown = sorted(set(stages) - set(STAGES + EXTRA_STAGES))
    if unknown:
        raise UsageError(f"--stages: unknown {unknown}; use a comma-separated subset of "
                         f"{', '.join(STAGES + EXTRA_STAGES)}")
    if args.hw_decoder_load is not None and not 0 <= args.hw_decoder_load <= 1:
        raise UsageError(f"--hw-decoder-load {args.hw_decoder_load}: a share in [0, 1]")
    index = _index(args)
    here = place(args.device, threads=args.threads, py_workers=args.py_workers)
    threads = here.dali_threads
    spec = BenchSpec(device=args.device, device_id=here.gpu_index, batch_size=args.batch_size, threads=threads,
                     py_workers=args.py_workers, batches=args.batches, warmup=args.warmup, crop_size=args.crop_size,
                     hw_decoder_load=HW_DECODER_LOAD if args.hw_decoder_load is None else args.hw_decoder_load,
                     prefetch=args.prefetch)
    result = run_bench(index, spec, stages, baseline=args.baseline)
    result["placement"] = here.describe()
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(f"{args.data}: {len(index)} images, {args.device}, {threads} DALI threads, {args.py_workers} Python workers, "
          f"prefetch {args.prefetch}, batch {args.batch_size}, {args.batches} batches")
    for stage, value in result["stages"].items():
        print(f"  {stage:10s} {value:10,.0f} images/s")
    for stage, value in result["baseline"].items():
        print(f"  baseline {stage} (PIL DataLoader, {threads} workers) {value:10,.0f} images/s")
    for name, value in result["ratios"].items():
        print(f"  {name.replace('_', ' ')}: {value:.2f}x")
    return 0


def tune_input(args: argparse.Namespace) -> int:
    """`bench-input --tune`: search the input settings, print the table best first, write the --set file."""
    from pipeline.bench import BenchSpec
    from pipeline.tune import BudgetTooSmall, InputSettings, full_stage, label, tune
    from training.placement import place

    given = [flag for flag, value in (("--threads", args.threads), ("--py-workers", args.py_workers),
                                      ("--prefetch", args.prefetch), ("--hw-decoder-load", args.hw_decoder_load),
                                      ("--stages", args.stages), ("--baseline", args.baseline or None),
                                      ("--plot", args.plot)) if value is not None]
    if given:
        raise UsageError(f"--tune searches the input settings itself; drop {', '.join(given)}")
    if args.batch_size < 1 or args.batches < 1 or args.repeats < 2 or args.budget_s <= 0 or \
            (args.cpus is not None and args.cpus < 1):
        raise UsageError(f"--batch-size {args.batch_size}, --batches {args.batches} and --cpus {args.cpus} must be "
                         f">= 1, --repeats {args.repeats} >= 2 (the noise comes from them), --budget-s {args.budget_s} > 0")
    index = _index(args)
    here = place(args.device)
    cpus = args.cpus or here.cpus
    mask = sorted(os.sched_getaffinity(0))
    pinned = ""
    if cpus < len(mask):  # measure within one rank's share: the pipelines' threads and workers inherit the mask
        os.sched_setaffinity(0, mask[:cpus])
        pinned = f", pinned to CPUs {','.join(map(str, mask[:cpus]))}"
    d = DataConfig()  # training's defaults, placed as a rank with this share would place them
    gpu = args.device == "gpu"
    default = InputSettings(threads=d.threads or max(1, cpus - d.py_workers), py_workers=d.py_workers,
                            prefetch=d.prefetch, hw_decoder_load=d.hw_decoder_load if gpu else None)
    spec = BenchSpec(device=args.device, device_id=here.gpu_index, batch_size=args.batch_size, batches=args.batches,
                     warmup=args.warmup, crop_size=args.crop_size)
    print(f"{args.data}: {len(index)} images, {args.device}, a {cpus}-CPU share{pinned}, batch {args.batch_size}, crop "
          f"{args.crop_size}; each run: the full stage, {args.batches} batches after {args.warmup}; {args.repeats} "
          f"interleaved runs per candidate; budget {args.budget_s:g} s", flush=True)
    try:
        result = tune(default, cpus, full_stage(index, spec), budget_s=args.budget_s, repeats=args.repeats, gpu=gpu)
    except BudgetTooSmall as e:
        raise UsageError(f"--budget-s: {e}") from None
    report = result.to_json()
    report.update({"device": args.device, "cpus": cpus, "batch_size": args.batch_size, "crop_size": args.crop_size,
                   "batches": args.batches, "images": len(index), "host": socket.gethostname(),
                   "pinned_cpus": mask[:cpus] if pinned else None, "placement": here.describe()})
    write_json(args.json, report)
    widths = {name: max(len(name), 5) for name in default.as_dict()}
    print("  " + " ".join(f"{n:>{w}}" for n, w in widths.items()) + f" {'images/s':>10}  {'spread':>8}  runs")
    for c in result.candidates:
        marks = [m for m, on in (("recommended", c is result.best and result.recommended_change),
                                 ("defaults", c is result.default)) if on]
        values = " ".join(f"{v:>{w}g}" for v, w in zip(c.settings.as_dict().values(), widths.values()))
        runs = ", ".join(f"{r:,.0f}" for r in c.runs)
        print(f"  {values} {c.median:>10,.0f}  {c.spread:>8,.0f}  {runs}" + (f"  <- {', '.join(marks)}" if marks else ""))
    gain = result.fastest.median - result.default.median
    if result.recommended_change:
        print(f"{label(result.best.settings)}: {gain:+,.0f} img/s over the defaults, more than the noise "
              f"({result.noise:,.0f} img/s, the larger spread of the two): recommended")
    else:
        print(f"no candidate beats the defaults by more than the noise ({result.noise:,.0f} img/s; the fastest, "
              f"{label(result.fastest.settings)}, by {gain:+,.0f}): keep the defaults")
    for line in result.skipped:
        print(f"  not measured: {line}")
    out = Path(args.set_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(set_file_text(result, args, cpus))
    print(f"wrote {out}: use it with `senet train CONFIG --set-file {out}` or `senet submit CONFIG --set-file {out}`")
    return 0


def set_file_text(result: TuneResult, args: argparse.Namespace, cpus: int) -> str:
    """The winner as `--set` lines (`--set-file`), headed by comments saying what was measured where."""
    why = (f"{result.best.median:,.0f} img/s against the defaults' {result.default.median:,.0f} (noise "
           f"{result.noise:,.0f})" if result.recommended_change else
           f"no candidate beat the defaults ({result.default.median:,.0f} img/s) by more than the noise "
           f"({result.noise:,.0f}): these are the defaults")
    lines = [f"# senet bench-input --tune on {socket.gethostname()}: {args.data}, {args.device}, a {cpus}-CPU share "
             f"per rank, batch {args.batch_size}, crop {args.crop_size}",
             f"# {why}",
             "# use: senet train CONFIG --set-file THIS_FILE   (or senet submit); a --set given too wins"]
    lines += [f"data.{key}={value:g}" if isinstance(value, float) else f"data.{key}={value}"
              for key, value in result.best.settings.as_dict().items()]
    return "\n".join(lines) + "\n"


def cmd_preview_augment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec
    from pipeline.loader import TrainLoader
    from training.placement import place

    if args.n < 1:
        raise UsageError(f"--n {args.n} must be >= 1")
    index = _index(args)
    with TrainLoader(index, batch_size=args.n, rank=0, world_size=1, device="cpu", seed=args.seed,
                     sampling="class_aware", samples_per_epoch=max(args.n, len(index)), aug=AugmentSpec(),
                     crop_size=args.crop_size, dtype="float32", layout="NHWC", threads=place("cpu").dali_threads,
                     py_workers=0, prefetch=1) as loader:
        images, labels = next(iter(loader))
    pixels = images.numpy() * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)  # denormalise
    tiles = np.clip(pixels, 0, 255).astype(np.uint8)
    cols = math.ceil(math.sqrt(args.n))
    rows = math.ceil(args.n / cols)
    s, gap = args.crop_size, 4
    grid = np.full((rows * (s + gap) + gap, cols * (s + gap) + gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[gap + r * (s + gap):gap + r * (s + gap) + s, gap + c * (s + gap):gap + c * (s + gap) + s] = tile
    Image.fromarray(grid).save(args.out)
    names = ", ".join(index.classes[i] for i in labels.tolist()[:8])
    print(f"wrote {args.out}: {args.n} augmented training samples ({rows}x{cols} grid), classes {names}"
          + (" ..." if args.n > 8 else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `senet` parser."""
    p = sub.add_parser("bench-input", help="input pipeline throughput per stage (and the PIL DataLoader baseline)")
    p.add_argument("data", help="folder of class folders, or an ILSVRC root (its train/ is used)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="DALI threads (default: this process's CPU share less "
                   "the Python workers)")
    p.add_argument("--hw-decoder-load", type=float, default=None, help="share of JPEGs for the GPU's hardware "
                   "decoder, where it has one (default 0.65, as data.hw_decoder_load; 0: nvJPEG's hybrid decoder only)")
    p.add_argument("--py-workers", type=int, default=None, help="Python worker processes feeding DALI (default 0)")
    p.add_argument("--prefetch", type=int, default=None, help=f"batches DALI prepares ahead (data.prefetch; default "
                   f"{DataConfig().prefetch})")
    p.add_argument("--batches", type=int, default=None, help=f"timed batches per stage or tuning run (after --warmup; "
                   f"default {STAGE_BATCHES}, with --tune {TUNE_BATCHES})")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--stages", default=None, help="comma-separated subset of read,decode,crop_flip,full "
                   "(default: all four), plus naive (the textbook graph, for comparison)")
    p.add_argument("--baseline", action="store_true", help="also time the PIL DataLoader baseline")
    p.add_argument("--json", help="write the results here (with --tune: default, best and every candidate)")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--tune", action="store_true", help="search DALI threads, Python workers, prefetch and (GPU) "
                   "hw_decoder_load within the CPU share; print them best first and write the winner as --set lines")
    p.add_argument("--cpus", type=int, default=None, help="--tune: the CPU share of one training rank (default: this "
                   "process's share; give slurm.cpus_per_task when tuning for a job's ranks); the search is pinned to "
                   "that many of this process's CPUs")
    p.add_argument("--budget-s", type=float, default=300.0, help="--tune: seconds the whole search may take")
    p.add_argument("--repeats", type=int, default=3, help="--tune: interleaved runs per candidate (>= 2)")
    p.add_argument("--set-out", default="tuned-input.set", metavar="F", help="--tune: the file of --set lines to "
                   "write (senet train/submit --set-file F)")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_bench_input)

    p = sub.add_parser("preview-augment", help="a grid of augmented training samples")
    p.add_argument("data", help="folder of class folders, or an ILSVRC root (its train/ is used)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=int, default=16, help="samples in the grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=224)
    add_exclusion_options(p)
    p.set_defaults(func=cmd_preview_augment)
