"""Why the tiny nets downsample with max-pools: the same tiny SE-ResNeXt with max-pool or strided downsampling,
trained on the same synthetic classes, compared by val top-1.

The tiny nets (`se_resnext_tiny`, `se_resnet_tiny`) serve the tests and the CPU demo at 48-96 px. This
trains each variant with the demo recipe (configs/demo.yaml: class-aware sampling, crop + flip +
rotation + colour jitter through DALI, SGD with warm-up and cosine) in one process, for a few epochs
and a few seeds, interleaved (seed by seed, alternating which variant goes first), and prints the
final val top-1 of each. Measures and prints; never asserts.

Usage::

    python benchmarks/bench_tiny_downsampling.py                   # 6 classes x 80, 64 px, 4 epochs, 3 seeds
    python benchmarks/bench_tiny_downsampling.py --json tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models import create_model  # noqa: E402
from pipeline.synthetic import SyntheticSpec, make_synthetic  # noqa: E402
from training.build import build  # noqa: E402
from training.config import load_config  # noqa: E402
from training.engine import fit  # noqa: E402
from training.placement import place_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"maxpool": {}, "stride": {"downsample": "stride"}}  # overrides of se_resnext_tiny


def train_once(data: Path, out: Path, variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the demo recipe with the variant's model; its final val top-1 and wall time."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={data}", f"data.cache_dir={out / 'cache'}", f"model.num_classes={args.classes}",
        f"data.crop_size={args.crop}", f"train.epochs={args.epochs}", f"train.seed={seed}", "data.py_workers=0",
        "train.checkpoint_every=100000", "train.log_every=1000"])
    model = create_model(cfg.model.arch, num_classes=args.classes, **VARIANTS[variant])
    start = time.perf_counter()
    r = build(cfg, place_run(cfg), out / f"{variant}-{seed}", model=model)
    try:
        summary = fit(r, resume=None)
    finally:
        r.close()
    return {"variant": variant, "seed": seed, "val_top1": summary["val_top1"], "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_tiny_"))
    data = work / "data"
    make_synthetic(data, SyntheticSpec(classes=args.classes, train_per_class=args.per_class, val_per_class=10, test=0,
                                       seed=1))
    rows = []
    for seed in range(args.seeds):
        order = list(VARIANTS) if seed % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            rows.append(train_once(data, work, variant, seed, args))
            print(f"seed {seed} {variant:>7}: val top-1 {rows[-1]['val_top1']:.3f} ({rows[-1]['seconds']:.0f} s)",
                  flush=True)
    summary = {v: {"median_top1": statistics.median(r["val_top1"] for r in rows if r["variant"] == v),
                   "top1": [r["val_top1"] for r in rows if r["variant"] == v]} for v in VARIANTS}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
              "load_avg": os.getloadavg(), "classes": args.classes, "per_class": args.per_class, "crop": args.crop,
              "epochs": args.epochs, "chance": 1 / args.classes, "runs": rows, "summary": summary}
    for v, s in summary.items():
        print(f"{v:>7}: median val top-1 {s['median_top1']:.3f} over seeds {s['top1']} (chance {1 / args.classes:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
