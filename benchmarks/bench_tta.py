"""Time to accuracy on a CPU-sized data set: the fixed recipe vs progressive resizing vs progressive + weight EMA.

    python benchmarks/bench_tta.py [--data ROOT] [--seeds 3] [--epochs 12] [--classes 16] [--per-class 50]
                                   [--cpus 1] [--out DIR] [--json F]
    python benchmarks/bench_tta.py --report F.json          # the tables again, from a saved --json

Data: `senet make-synthetic`'s learnable classes (default 16 x 50 training and 16 x 20 validation
images of 200-500 px, made once under --out: 6 classes x 100 reached 1.000 top-1 by epoch 8 in a trial,
too easy to compare final accuracies), or any ILSVRC-layout tree with val/ and its devkit (--data).
Each run is `senet train` as a user runs it (one process on a 1-CPU share, `--cpus`), of one base
recipe — the demo's (se_resnext_tiny, class-aware sampling, flip + rotation + colour jitter, label
smoothing 0.1, warm-up + cosine, batch 16) at a final crop of 64 px, validated at 64 px after every
epoch — and:

  fixed            every epoch at 64 px
  progressive      48 px, then 64 px, FFCV's ramp shape (data.crop_size_start=48, multiples of 16; the
                   ramp ends default to 65/88 and 76/88 of the epochs)
  progressive_ema  the same and a weight EMA (train.ema_decay=0.99; its weights are the recipe's result)

Each seed runs all three recipes, in an order rotated from seed to seed, so slow phases of a shared
machine fall on all recipes alike. Time is the training time of the epochs (`epoch_s` in
metrics.jsonl: steps, input waits included; validation and process start excluded), split into the
time the training loop waited for data (`data_wait_s`, "input") and the rest ("compute"). The target
is 95 % of the fixed recipe's mean final top-1; a run's time to it is the training time up to the
end of the first epoch whose validation reaches it; the epochs to it, and the pixels trained on until
then in epochs at the final size (sum of (size / 64)^2), are the same measure free of the machine's
load. Reported per recipe: median and spread (min-max) over the seeds. No threshold: the table is the
result.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_input import cpu_model  # noqa: E402
from pipeline.synthetic import SyntheticSpec, make_synthetic  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

BASE = """# bench_tta's base recipe: configs/demo.yaml's, one process
model: {arch: se_resnext_tiny, channels_last: false}
data: {sampling: class_aware, crop_size: 64, dtype: float32, py_workers: 1, threads: 1}
optim: {lr: 0.08, reference_batch: 64, warmup_epochs: 1, schedule: cosine, label_smoothing: 0.1}
train: {device: cpu, batch_size: 16, precision: fp32, log_every: 50, checkpoint_every: 100000}
"""
RECIPES = {
    "fixed": [],
    "progressive": ["data.crop_size_start=48", "data.crop_size_multiple=16"],
    "progressive_ema": ["data.crop_size_start=48", "data.crop_size_multiple=16", "train.ema_decay=0.99"],
}
TARGET = 0.95  # of the fixed recipe's mean final top-1


def run_recipe(name: str, seed: int, args: argparse.Namespace, data: Path, classes: int, out: Path) -> dict[str, Any]:
    """One `senet train` run; its epochs' sizes, times and accuracies (the recipe's weights: EMA when it has one)."""
    folder = out / "runs" / f"{name}-seed{seed}"
    sets = [f"data.root={data}", f"model.num_classes={classes}", f"data.cache_dir={out / 'cache'}",
            f"train.epochs={args.epochs}", f"train.seed={seed}", *RECIPES[name]]
    command = [sys.executable, "-m", "senet", "train", str(out / "base.yaml"), "--out", str(folder), "--resume", "none",
               *[a for s in sets for a in ("--set", s)]]
    started, cpu = time.monotonic(), _children_cpu_s()
    # A 1-CPU share (one torch thread): on a shared machine, two torch threads wait for each other at OpenMP
    # barriers whenever another process holds a core, which multiplied epoch times by up to 15 in a trial.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_CPUS_PER_TASK": str(args.cpus)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.monotonic() - started, _children_cpu_s() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    epochs = [r for r in read_metrics(folder / "metrics.jsonl") if "epoch_s" in r]
    key = "val_top1_ema" if "ema" in name else "val_top1"
    return {"recipe": name, "seed": seed, "wall_s": wall, "cpu_s": cpu, "sizes": [r["crop_size"] for r in epochs],
            "epoch_s": [r["epoch_s"] for r in epochs], "data_wait_s": [r["data_wait_s"] for r in epochs],
            "top1": [r[key] for r in epochs], "raw_top1": [r["val_top1"] for r in epochs]}


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (the runs, their ranks and DALI workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_epoch(run: dict[str, Any], target: float) -> int | None:
    """The first epoch (from 0) whose validation reaches `target`; None if none does."""
    return next((e for e, top1 in enumerate(run["top1"]) if top1 >= target), None)


def time_to(run: dict[str, Any], target: float) -> float | None:
    """Training seconds up to the end of the first epoch whose validation reaches `target`; None if none does."""
    epoch = first_epoch(run, target)
    return None if epoch is None else sum(run["epoch_s"][:epoch + 1])


def work_to(run: dict[str, Any], target: float, final: int) -> float | None:
    """The pixels trained on up to that epoch, in epochs at the final size (sum of (size / final)^2): the
    compute to the target, which the machine's load does not move."""
    epoch = first_epoch(run, target)
    return None if epoch is None else sum((s / final) ** 2 for s in run["sizes"][:epoch + 1])


def spread(values: list[float], fmt: str) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(runs: list[dict[str, Any]], target: float) -> list[str]:
    """The result: per recipe, medians and spreads over the seeds."""
    final = max(runs[0]["sizes"])
    lines = ["| recipe | crop side per epoch | final top-1, median (min-max) | epochs to target | work to target, "
             f"{final}-px epochs | time to target, s | training time, s | of which input (waiting for data) | "
             "compute | CPU s per run (all of it) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fixed: dict[str, float] = {}
    for name in RECIPES:
        mine = [r for r in runs if r["recipe"] == name]
        reached = [r for r in mine if first_epoch(r, target) is not None]
        epochs = [first_epoch(r, target) + 1 for r in reached]
        work = [work_to(r, target, final) for r in reached]
        times = [time_to(r, target) for r in reached]
        total = [sum(r["epoch_s"]) for r in mine]
        wait = [sum(r["data_wait_s"]) for r in mine]
        sizes = mine[0]["sizes"]
        shown = ", ".join(f"{s} x {sizes.count(s)}" for s in dict.fromkeys(sizes))
        if name == "fixed" and reached:
            fixed = {"work": statistics.median(work), "time": statistics.median(times)}

        def versus(values: list[float], key: str) -> str:
            return f" ({statistics.median(values) / fixed[key]:.2f}x)" if fixed and name != "fixed" else ""

        got = f"{len(reached)}/{len(mine)}: " if len(reached) < len(mine) else ""
        lines.append(
            f"| {name} | {shown} | {spread([r['top1'][-1] for r in mine], '.3f')} | "
            + (f"{got}{spread(epochs, 'd')} | {spread(work, '.2f')}{versus(work, 'work')} | "
               f"{spread(times, '.1f')}{versus(times, 'time')} | " if reached else "not reached | - | - | ")
            + f"{spread(total, '.1f')} | {statistics.median(wait):.1f} "
            f"({statistics.median(w / t for w, t in zip(wait, total)):.0%}) | "
            f"{statistics.median(t - w for t, w in zip(total, wait)):.1f} | {statistics.median(r['cpu_s'] for r in mine):.0f} |")
    return lines


def report(result: dict[str, Any]) -> str:
    """The Markdown section: machine and load, target, the table, and each recipe's median top-1 per epoch."""
    runs, target = result["runs"], result["target"]
    lines = [f"Machine: {result['machine']}; load average (1/5/15 min) "
             f"{'/'.join(f'{v:.1f}' for v in result['load_before'])} before, "
             f"{'/'.join(f'{v:.1f}' for v in result['load_after'])} after; {result['seconds'] / 60:.0f} min in all.",
             f"Data: {result['data']} ({result['classes']} classes); {result['epochs']} epochs; "
             f"{len(runs) // len(RECIPES)} seeds; each run on a {result.get('cpus', 1)}-CPU share. Target: "
             f"{TARGET:.0%} of the fixed recipe's mean final top-1 = {target:.3f}.", "", *table(runs, target), "",
             "Median top-1 after each epoch (the recipe's weights; the EMA's for progressive_ema):", "",
             "| recipe | " + " | ".join(str(e + 1) for e in range(result["epochs"])) + " |",
             "| --- |" + " ---: |" * result["epochs"]]
    for name in RECIPES:
        mine = [r["top1"] for r in runs if r["recipe"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(v):.3f}" for v in zip(*mine)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="an ILSVRC-layout tree with val/ and its devkit (default: make-synthetic's, made once)")
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--cpus", type=int, default=1, help="each run's CPU share (SLURM_CPUS_PER_TASK; torch threads)")
    p.add_argument("--out", default="/tmp/senet-bench-tta")
    p.add_argument("--json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "synthetic.json").is_file():
        make_synthetic(data, SyntheticSpec(classes=args.classes, train_per_class=args.per_class, val_per_class=20,
                                           test=0, seed=1))
    classes = sum(1 for d in (data / "train").iterdir() if d.is_dir())
    (out / "base.yaml").write_text(BASE)
    before, started = list(os.getloadavg()), time.monotonic()
    names = list(RECIPES)
    runs = []
    for seed in range(args.seeds):
        for name in names[seed % len(names):] + names[:seed % len(names)]:
            run = run_recipe(name, seed, args, data, classes, out)
            runs.append(run)
            print(f"seed {seed} {name}: top-1 {run['top1'][-1]:.3f}, training {sum(run['epoch_s']):.1f} s (wall "
                  f"{run['wall_s']:.0f} s), load {os.getloadavg()[0]:.1f}", flush=True)
    after = list(os.getloadavg())
    target = TARGET * statistics.mean(r["top1"][-1] for r in runs if r["recipe"] == "fixed")
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs visible", "load_before": before, "load_after": after,
              "seconds": time.monotonic() - started, "data": str(data), "classes": classes, "epochs": args.epochs,
              "cpus": args.cpus, "target": target, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(report(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":  # the table again, from a saved --json
        print(report(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
