"""Time one epoch's sample order: ImageNet-sized, long-tailed classes, many ranks.

    python benchmarks/bench_sampling.py [--classes 1000] [--images 1281167] [--ranks 64] [--runs 7]

Each row is the median (and min) over `--runs` fresh epochs after one warm-up epoch, so no row is
served from the sampler's one-epoch cache unless it says so.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import numpy as np

from pipeline.sampling import ClassAwareSampler, ShuffleSampler


def long_tailed_counts(classes: int, images: int, largest: int = 1300, smallest: int = 732) -> np.ndarray:
    """Per-class counts from `largest` down to `smallest` summing to about `images` (ImageNet-1k: 1300..732)."""
    x = np.linspace(0.0, 1.0, classes)
    # Most classes full, a short steep tail, like ImageNet: pick the tail's exponent to hit the total.
    exponent = (largest - smallest) * classes / max(largest * classes - images, 1) - 1
    return np.round(largest - (largest - smallest) * x ** max(exponent, 0.0)).astype(np.int64)


def timed(run: Callable[[int], object], runs: int) -> tuple[float, float]:
    """(median, min) seconds of run(epoch) over fresh epochs 1..runs, after a warm-up at epoch 0."""
    run(0)
    times = []
    for epoch in range(1, runs + 1):
        start = time.perf_counter()
        run(epoch)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def balance(labels: np.ndarray, sampler: ClassAwareSampler, batch: int) -> list[tuple[str, str, str]]:
    """Class spread of mini-batches: this module's interleaved shards vs contiguous per-rank slices."""
    world, per_rank, classes = sampler.num_replicas, len(sampler), sampler.num_classes
    order = labels[sampler.global_order(0)[:sampler.total_size]]
    layouts = {"interleaved": order.reshape(per_rank, world).T, "contiguous": order.reshape(world, per_rank)}
    rows = []
    for name, how in [("distinct classes in a rank's batch (mean)", lambda s: s[0, :batch]),
                      ("distinct classes in a rank's window of C samples (mean)", lambda s: s[0, :classes]),
                      ("distinct classes in a global batch (mean)", lambda s: s[:, :batch])]:
        cells = []
        for shards in layouts.values():
            steps = range(0, per_rank - classes, batch)
            cells.append(f"{np.mean([len(np.unique(how(shards[:, k:]))) for k in steps]):.1f}")
        rows.append((name, *cells))
    steps = range(0, per_rank - batch, batch)
    rows.append(("most copies of one class in a global batch (max)",
                 *(str(max(np.bincount(s[:, k:k + batch].ravel()).max() for k in steps)) for s in layouts.values())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1_281_167)  # ILSVRC2012 train
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch for the balance table")
    args = parser.parse_args()

    counts = long_tailed_counts(args.classes, args.images)
    labels = np.repeat(np.arange(args.classes), counts)
    rank = args.ranks - 1
    start = time.perf_counter()
    relay = ClassAwareSampler(labels, num_replicas=args.ranks, rank=rank)
    build_s = time.perf_counter() - start
    shuffle = ShuffleSampler(len(labels), num_replicas=args.ranks, rank=rank)

    def state_roundtrip(epoch: int) -> None:
        relay.set_epoch(epoch)
        fresh = ClassAwareSampler(labels, num_replicas=args.ranks // 2, rank=0)
        fresh.load_state_dict(relay.state_dict(consumed=100))

    def iterate(epoch: int) -> None:
        relay.set_epoch(epoch)
        for _ in relay:
            pass

    rows = [
        ("ClassAwareSampler: build (group labels by class)", (build_s, build_s)),
        ("ClassAwareSampler: global_order, new epoch", timed(relay.global_order, args.runs)),
        ("ClassAwareSampler: rank_indices, new epoch", timed(relay.rank_indices, args.runs)),
        ("ClassAwareSampler: set_epoch + iterate this rank", timed(iterate, args.runs)),
        ("ClassAwareSampler: state_dict -> load_state_dict (other world size)", timed(state_roundtrip, args.runs)),
        ("ShuffleSampler: rank_indices, new epoch", timed(shuffle.rank_indices, args.runs)),
    ]
    print(f"{len(labels):,} images, {args.classes} classes ({counts.min()}..{counts.max()} per class), "
          f"{args.ranks} ranks ({len(relay):,} samples per rank); numpy {np.__version__}, "
          f"Python {platform.python_version()}; median / min of {args.runs} epochs\n")
    print("| operation | median ms | min ms |")
    print("| --- | ---: | ---: |")
    for name, (median, best) in rows:
        print(f"| {name} | {median * 1e3:.1f} | {best * 1e3:.1f} |")

    print(f"\nClass spread, epoch 0, batch {args.batch} per rank ({args.batch * args.ranks} global), "
          f"C = {relay.num_classes}: this module's interleaved shards vs contiguous per-rank slices\n")
    print("| measure | interleaved | contiguous |")
    print("| --- | ---: | ---: |")
    for row in balance(labels, relay, args.batch):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
