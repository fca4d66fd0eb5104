"""`senet` commands for the input pipeline: bench-input, preview-augment."""
from __future__ import annotations

import argparse
import math

from senet.console import UsageError, add_exclusion_options, write_json


def _index(args: argparse.Namespace):
    """The training images of DATA less check-data's exclusion list (and --exclude), like training reads them."""
    from pipeline.datasets import index_train, load_exclusions

    index = index_train(args.data, args.cache_dir)
    return index.without(load_exclusions(args.data, args.cache_dir, args.exclude))


def cmd_bench_input(args: argparse.Namespace) -> int:
    from pipeline.bench import EXTRA_STAGES, STAGES, BenchSpec, plot, run_bench
    from pipeline.dali import HW_DECODER_LOAD
    from training.placement import place

    if args.batch_size < 1 or args.batches < 1 or (args.threads is not None and args.threads < 1):
        raise UsageError(f"--batch-size {args.batch_size}, --batches {args.batches} and --threads {args.threads} "
                         f"must be >= 1")
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
                     hw_decoder_load=HW_DECODER_LOAD if args.hw_decoder_load is None else args.hw_decoder_load)
    result = run_bench(index, spec, stages, baseline=args.baseline)
    result["placement"] = here.describe()
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(f"{args.data}: {len(index)} images, {args.device}, {threads} DALI threads, {args.py_workers} Python workers, "
          f"batch {args.batch_size}, {args.batches} batches")
    for stage, value in result["stages"].items():
        print(f"  {stage:10s} {value:10,.0f} images/s")
    for stage, value in result["baseline"].items():
        print(f"  baseline {stage} (PIL DataLoader, {threads} workers) {value:10,.0f} images/s")
    for name, value in result["ratios"].items():
        print(f"  {name.replace('_', ' ')}: {value:.2f}x")
    return 0


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
    p.add_argument("--py-workers", type=int, default=0, help="Python worker processes feeding DALI")
    p.add_argument("--batches", type=int, default=100, help="timed batches per stage (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--stages", default=None, help="comma-separated subset of read,decode,crop_flip,full "
                   "(default: all four), plus naive (the textbook graph, for comparison)")
    p.add_argument("--baseline", action="store_true", help="also time the PIL DataLoader baseline")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
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
