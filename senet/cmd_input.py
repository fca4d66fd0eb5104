"""`senet` commands for the input pipeline: bench-input (per stage, or `--tune`), preview-augment."""
from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from senet.console import UsageError, add_exclusion_options, add_set_options, config_overrides, write_json
from training.config import Config, DataConfig, load_config
from training.ranks import DistInfo

if TYPE_CHECKING:
    from pipeline.bench import BenchSpec
    from pipeline.input_spec import TrainInput
    from pipeline.tune import TuneResult
    from training.placement import Placement

STAGE_BATCHES, TUNE_BATCHES = 100, 20  # timed batches of a stage; of one tuning run (a search makes dozens)


def _index(args: argparse.Namespace):
    """The training images of DATA less check-data's exclusion list (and --exclude), like training reads them."""
    from pipeline.datasets import index_train, load_exclusions

    index = index_train(args.data, args.cache_dir)
    return index.without(load_exclusions(args.data, args.cache_dir, args.exclude))


BENCH_BATCH = 64  # images per batch when neither --batch-size nor --config says


def crop_sizes(text: str | None) -> list[int] | None:
    """--crop-size: one side or a comma-separated list of sides (each measured in turn)."""
    if text is None:
        return None
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--crop-size {text!r}: a side in pixels or a comma-separated list, e.g. 160,192,224") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--crop-size {text!r}: sides must be at least 1 pixel")
    return list(dict.fromkeys(sizes))


def bench_config(args: argparse.Namespace, tune: bool = False) -> Config:
    """The config whose training input bench-input measures: --config (or training's defaults, with bench-input's
    batch of 64 and, outside --tune, no Python workers), then --set-file, --set and the flags given."""
    items: list[str | tuple[str, str]] = []
    if args.config is None:
        items += ["train.device=cpu", f"train.batch_size={BENCH_BATCH}"] + ([] if tune else ["data.py_workers=0"])
    items += config_overrides(args)
    flags = {"train.device": args.device, "train.batch_size": args.batch_size, "data.threads": args.threads,
             "data.py_workers": args.py_workers, "data.prefetch": args.prefetch,
             "data.hw_decoder_load": args.hw_decoder_load}
    items += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(args.config, items)


def bench_spec(args: argparse.Namespace, tune: bool = False) -> tuple[BenchSpec, list[int], Placement]:
    """What bench-input measures: the training input spec of `bench_config` on this process, the crop sizes
    to measure it at (--crop-size, else every size of the config's schedule), and the placement."""
    from pipeline.bench import BenchSpec
    from training.inputs import crop_schedule, train_input
    from training.placement import place_run

    cfg = bench_config(args, tune)
    here = place_run(cfg, DistInfo())  # one process, whatever launched it
    sizes = crop_sizes(args.crop_size) or sorted(set(crop_schedule(cfg).sizes(cfg.train.epochs)))
    return BenchSpec(input=train_input(cfg, here), batches=args.batches, warmup=args.warmup), sizes, here


def cmd_bench_input(args: argparse.Namespace) -> int:
    from pipeline.bench import EXTRA_STAGES, STAGES, plot, run_bench

    if args.batches is None:
        args.batches = TUNE_BATCHES if args.tune else STAGE_BATCHES
    if args.tune:
        return tune_input(args)
    if args.batches < 1 or args.warmup < 0:
        raise UsageError(f"--batches {args.batches} must be >= 1 and --warmup {args.warmup} >= 0")
    stages = args.stages.split(",") if args.stages else list(STAGES)
    unknown = sorted(set(stages) - set(STAGES + EXTRA_STAGES))
    if unknown:
        raise UsageError(f"--stages: unknown {unknown}; use a comma-separated subset of "
                         f"{', '.join(STAGES + EXTRA_STAGES)}")
    spec, sizes, here = bench_spec(args)
    index = _index(args)
    results = {}
    for size in sizes:
        result = run_bench(index, spec.at_size(size), stages, baseline=args.baseline)
        results[size] = result
    result = dict(results[sizes[0]], placement=here.describe(), input=asdict(spec.input))
    if len(sizes) > 1:
        result["by_crop_size"] = {str(size): r for size, r in results.items()}
    write_json(args.json, result)
    if args.plot:
        plot(results[sizes[-1]], args.plot)
    rt = spec.runtime
    print(f"{args.data}: {len(index)} images, {rt.device}, {rt.threads} DALI threads, {rt.py_workers} Python workers, "
          f"prefetch {rt.prefetch}, batch {spec.batch_size}, {args.batches} batches")
    names = list(results[sizes[0]]["stages"])
    print("  " + " " * 10 + "".join(f"{f'{size} px':>12}" for size in sizes) + "  (images/s)")
    for stage in names:
        print(f"  {stage:10s}" + "".join(f"{results[size]['stages'][stage]:12,.0f}" for size in sizes))
    if args.baseline:
        print(f"  {'baseline':10s}" + "".join(f"{results[size]['baseline']['full']:12,.0f}" for size in sizes)
              + f"  (PIL DataLoader, {rt.threads} workers)")
    for size in sizes:
        for name, value in results[size]["ratios"].items():
            print(f"  {name.replace('_', ' ')}" + (f" at {size} px" if len(sizes) > 1 else "") + f": {value:.2f}x")
    return 0


def tune_input(args: argparse.Namespace) -> int:
    """`bench-input --tune`: search the input settings, print the table best first, write the --set file."""
    from pipeline.tune import BudgetTooSmall, InputSettings, full_stage, label, tune

    given = [flag for flag, value in (("--threads", args.threads), ("--py-workers", args.py_workers),
                                      ("--prefetch", args.prefetch), ("--hw-decoder-load", args.hw_decoder_load),
                                      ("--stages", args.stages), ("--baseline", args.baseline or None),
                                      ("--plot", args.plot)) if value is not None]
    if given:
        raise UsageError(f"--tune searches the input settings itself; drop {', '.join(given)}")
    if args.batches < 1 or args.repeats < 2 or args.budget_s <= 0 or (args.cpus is not None and args.cpus < 1):
        raise UsageError(f"--batches {args.batches} and --cpus {args.cpus} must be >= 1, --repeats {args.repeats} >= 2 "
                         f"(the noise comes from them), --budget-s {args.budget_s} > 0")
    spec, sizes, here = bench_spec(args, tune=True)
    if args.crop_size is not None and len(sizes) > 1:
        raise UsageError(f"--crop-size {args.crop_size}: --tune searches at one size; give one")
    spec = spec.at_size(max(sizes))  # a progressive schedule: its largest, most expensive size
    index = _index(args)
    cpus = args.cpus or here.cpus
    mask = sorted(os.sched_getaffinity(0))
    pinned = ""
    if cpus < len(mask):  # measure within one rank's share: the pipelines' threads and workers inherit the mask
        os.sched_setaffinity(0, mask[:cpus])
        pinned = f", pinned to CPUs {','.join(map(str, mask[:cpus]))}"
    d = bench_config(args, tune=True).data  # the config's settings, placed as a rank with this share would place them
    gpu = spec.runtime.device == "gpu"
    default = InputSettings(threads=d.threads or max(1, cpus - d.py_workers), py_workers=d.py_workers,
                            prefetch=d.prefetch, hw_decoder_load=d.hw_decoder_load if gpu else None)
    device, batch, crop = spec.runtime.device, spec.batch_size, spec.crop_size
    print(f"{args.data}: {len(index)} images, {device}, a {cpus}-CPU share{pinned}, batch {batch}, crop "
          f"{crop}; each run: the full stage, {args.batches} batches after {args.warmup}; {args.repeats} "
          f"interleaved runs per candidate; budget {args.budget_s:g} s", flush=True)
    try:
        result = tune(default, cpus, full_stage(index, spec), budget_s=args.budget_s, repeats=args.repeats, gpu=gpu)
    except BudgetTooSmall as e:
        raise UsageError(f"--budget-s: {e}") from None
    report = result.to_json()
    report.update({"device": device, "cpus": cpus, "batch_size": batch, "crop_size": crop,
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
    out.write_text(set_file_text(result, args, cpus, device, batch, crop))
    print(f"wrote {out}: use it with `senet train CONFIG --set-file {out}` or `senet submit CONFIG --set-file {out}`")
    return 0


def set_file_text(result: TuneResult, args: argparse.Namespace, cpus: int, device: str, batch: int, crop: int) -> str:
    """The winner as `--set` lines (`--set-file`), headed by comments saying what was measured where."""
    why = (f"{result.best.median:,.0f} img/s against the defaults' {result.default.median:,.0f} (noise "
           f"{result.noise:,.0f})" if result.recommended_change else
           f"no candidate beat the defaults ({result.default.median:,.0f} img/s) by more than the noise "
           f"({result.noise:,.0f}): these are the defaults")
    lines = [f"# senet bench-input --tune on {socket.gethostname()}: {args.data}, {device}, a {cpus}-CPU share "
             f"per rank, batch {batch}, crop {crop}",
             f"# {why}",
             "# use: senet train CONFIG --set-file THIS_FILE   (or senet submit); a --set given too wins"]
    lines += [f"data.{key}={value:g}" if isinstance(value, float) else f"data.{key}={value}"
              for key, value in result.best.settings.as_dict().items()]
    return "\n".join(lines) + "\n"


def preview_spec(args: argparse.Namespace) -> TrainInput:
    """The training input the preview shows: the config's (or training's defaults), on this process's CPU share,
    with the grid's batch, float32 NHWC tiles, no Python workers, and --crop-size when given."""
    from pipeline.input_spec import CropSchedule
    from training.inputs import train_input
    from training.placement import place_run

    items = [*config_overrides(args), "train.device=cpu"] + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, items)
    spec = train_input(cfg, place_run(cfg, DistInfo()))
    if args.crop_size is not None:
        spec = replace(spec, crop=CropSchedule(args.crop_size))
    return replace(spec, batch_size=args.n, samples_per_epoch=None, dtype="float32", layout="NHWC").with_runtime(
        py_workers=0, prefetch=1)


def cmd_preview_augment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pipeline.loader import TrainLoader

    if args.n < 1 or args.epoch < 0 or (args.crop_size is not None and args.crop_size < 1):
        raise UsageError(f"--n {args.n} and --crop-size {args.crop_size} must be >= 1, --epoch {args.epoch} >= 0")
    index = _index(args)
    spec = preview_spec(args)
    if len(index) < args.n:
        spec = replace(spec, samples_per_epoch=args.n)  # a tiny tree: the sampler repeats images to fill the grid
    with TrainLoader(index, spec) as loader:
        loader.set_epoch(args.epoch)
        images, labels = next(iter(loader))
        s = loader.crop_size
    pixels = images.numpy() * np.asarray(spec.std) + np.asarray(spec.mean)  # denormalise
    tiles = np.clip(pixels, 0, 255).astype(np.uint8)
    cols = math.ceil(math.sqrt(args.n))
    rows = math.ceil(args.n / cols)
    gap = 4
    grid = np.full((rows * (s + gap) + gap, cols * (s + gap) + gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[gap + r * (s + gap):gap + r * (s + gap) + s, gap + c * (s + gap):gap + c * (s + gap) + s] = tile
    Image.fromarray(grid).save(args.out)
    names = ", ".join(index.classes[i] for i in labels.tolist()[:8])
    print(f"wrote {args.out}: {args.n} augmented training samples of epoch {args.epoch} at {s} px ({rows}x{cols} "
          f"grid), classes {names}" + (" ..." if args.n > 8 else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `senet` parser."""
    p = sub.add_parser("bench-input", help="input pipeline throughput per stage (and the PIL DataLoader baseline)")
    p.add_argument("data", help="folder of class folders, or an ILSVRC root (its train/ is used)")
    p.add_argument("--config", help="measure this training config's input (its batch, augmentation, crop sizes, dtype, "
                   "layout, normalisation, threads, workers, prefetch, decoder); the flags below override it")
    add_set_options(p)
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="train.device (default cpu, or the config's)")
    p.add_argument("--batch-size", type=int, default=None, help=f"train.batch_size (default {BENCH_BATCH}, or the "
                   f"config's)")
    p.add_argument("--threads", type=int, default=None, help="DALI threads (default: this process's CPU share less "
                   "the Python workers)")
    p.add_argument("--hw-decoder-load", type=float, default=None, help="share of JPEGs for the GPU's hardware "
                   "decoder, where it has one (default 0.65, as data.hw_decoder_load; 0: nvJPEG's hybrid decoder only)")
    p.add_argument("--py-workers", type=int, default=None, help="Python worker processes feeding DALI (default 0, or "
                   "the config's; --tune: training's default)")
    p.add_argument("--prefetch", type=int, default=None, help=f"batches DALI prepares ahead (data.prefetch; default "
                   f"{DataConfig().prefetch})")
    p.add_argument("--batches", type=int, default=None, help=f"timed batches per stage or tuning run (after --warmup; "
                   f"default {STAGE_BATCHES}, with --tune {TUNE_BATCHES})")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--crop-size", default=None, metavar="S[,S...]", help="training crop side(s) to measure, each in "
                   "turn, e.g. 160,192,224 (default: every size of the config's crop schedule, 224 without a config)")
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
    p.add_argument("--config", help="show this training config's augmentation, crop size and normalisation")
    add_set_options(p)
    p.add_argument("--n", type=int, default=16, help="samples in the grid")
    p.add_argument("--seed", type=int, default=None, help="train.seed (default 0, or the config's)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose draws (and crop size) to show, from 0")
    p.add_argument("--crop-size", type=int, default=None, help="crop side (default: the config's size at --epoch, "
                   "224 without a config)")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_preview_augment)
