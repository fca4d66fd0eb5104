"""What a checkpoint costs the step loop: synchronous writes vs rank 0's background writer, side by side.

    python benchmarks/bench_checkpoint.py [--arch se_resnet50] [--steps 20] [--every 5] [--rounds 8]
                                          [--crop 32] [--batch-size 2] [--out DIR] [--json F]

The training engine itself (`training.engine.fit`, one process, CPU) trains `--arch` on device-resident
random batches, small enough that the state, not the step, is the point: SE-ResNet-50 holds 28.1 M
parameters, so a checkpoint with SGD momentum is about 225 MB. After one warm-up run (not reported), each
round runs three modes back to back, their order rotating from round to round:
- `steps only`: no periodic checkpoint, only the one at the end (the reference for the two others);
- `synchronous`: every `--every` steps, written inside the step loop (`train.background_checkpoints=false`);
- `background`: the same checkpoints, copied to host memory and written by rank 0's thread.
Every run ends with its end-of-run checkpoint landed.

Reported per mode, over all rounds:
- stall: the step loop's time inside a checkpoint call (the whole write when synchronous; waiting for the
  previous write plus the host copy in the background), median and max;
- write: the time from the start of the file to its commit (fsync and read-back included), median;
- step: the median step time with no write in flight, and with the background writer's write in flight
  (on a machine with few cores it competes with training for them);
- total: wall time from the first batch to the end of the run, min and median over rounds; and per
  periodic checkpoint, (total - the same round's `steps only` total) / periodic checkpoints, median.
On a machine shared with other jobs single steps can take ten times their usual time: the medians and
the round-by-round differences are what to read.

The run folders go to `--out` (default: a temporary folder beside this repository, so on its file system).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.loader import ResidentLoader
from training.build import Data, build
from training.config import load_config
from training.engine import fit
from training.metrics import read_metrics
from training.placement import place_run
from training.ranks import DistInfo

MODES = {"steps only": ["train.checkpoint_every=100000000", "train.background_checkpoints=false"],
         "synchronous": ["train.background_checkpoints=false"], "background": ["train.background_checkpoints=true"]}


class TimedLoader(ResidentLoader):
    """ResidentLoader that notes when each batch is handed out: step i lasts from batch i to batch i + 1."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.times: list[float] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in super().__iter__():
            self.times.append(time.perf_counter())
            yield batch


def one_run(args: argparse.Namespace, mode: str, out: Path) -> dict[str, Any]:
    """Train `--steps` steps with one writer; its stalls, writes, step times and total time."""
    sets = [f"model.arch={args.arch}", "model.num_classes=1000", "train.device=cpu", "train.precision=fp32",
            "train.epochs=1", f"train.batch_size={args.batch_size}", f"train.checkpoint_every={args.every}",
            "train.log_every=100000", "train.keep_checkpoints=2", "optim.lr=0.01", "optim.reference_batch=256",
            *MODES[mode]]  # later keys win: `steps only` overrides checkpoint_every
    cfg = load_config(None, sets)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size * args.steps, 3, args.crop, args.crop, generator=g)
    labels = torch.randint(0, 1000, (len(images),), generator=g)
    loader = TimedLoader(images, labels, args.batch_size)
    classes = tuple(f"n{i:08d}" for i in range(1000))
    r = build(cfg, place_run(cfg, DistInfo()), out, data=Data(classes), loaders=(loader, None))
    try:
        fit(r, resume=None)
        end = time.perf_counter()
    finally:
        r.close()
    rows = [row for row in read_metrics(out / "metrics.jsonl") if row.get("event") == "checkpoint"]
    starts = loader.times
    steps = [b - a for a, b in zip(starts, starts[1:])]  # step i (1-based i+1) until the next batch
    boundaries = {row["step"] for row in rows}
    # Background writes run from the end of their boundary's stall for write_s seconds.
    windows = [(starts[row["step"]], starts[row["step"]] + row["write_s"]) for row in rows if row["step"] < len(starts)]
    plain = [i for i in range(len(steps)) if i + 1 not in boundaries]  # steps that end without a checkpoint call
    writing = {i for i in plain if any(a < starts[i + 1] and starts[i] < b for a, b in windows)}
    busy = [steps[i] for i in plain if i in writing and mode == "background"]
    idle = [steps[i] for i in plain if i not in writing or mode != "background"]
    return {"mode": mode, "checkpoints": len(rows), "bytes": rows[-1]["bytes"], "stall_s": [r["stall_s"] for r in rows],
            "write_s": [r["write_s"] for r in rows], "step_idle_s": idle, "step_busy_s": busy,
            "total_s": end - starts[0]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: medians (and the worst stall) over every checkpoint and step of every round; totals."""
    table: dict[str, dict[str, Any]] = {}
    reference = {r["round"]: r["total_s"] for r in runs if r["mode"] == "steps only"}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        pooled = {k: [x for r in mine for x in r[k]] for k in ("stall_s", "write_s", "step_idle_s", "step_busy_s")}
        periodic = [(r["total_s"] - reference[r["round"]]) / (r["checkpoints"] - 1) for r in mine if r["checkpoints"] > 1]
        table[mode] = {"stall_median_s": statistics.median(pooled["stall_s"]), "stall_max_s": max(pooled["stall_s"]),
                       "write_median_s": statistics.median(pooled["write_s"]),
                       "step_idle_median_s": statistics.median(pooled["step_idle_s"]),
                       "step_busy_median_s": statistics.median(pooled["step_busy_s"]) if pooled["step_busy_s"] else None,
                       "total_s": [round(r["total_s"], 2) for r in mine], "total_min_s": min(r["total_s"] for r in mine),
                       "total_median_s": statistics.median(r["total_s"] for r in mine),
                       "per_checkpoint_s": statistics.median(periodic) if periodic else None}
    return table


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="se_resnet50")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="steps between checkpoints (and one at the end)")
    p.add_argument("--rounds", type=int, default=8, help="runs of each mode, in rotating order")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--out", help="folder for the run folders (default: a temporary one beside the repository)")
    p.add_argument("--json", help="write every run's numbers and the summary as JSON")
    args = p.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=".bench_checkpoint-", dir=Path(__file__).parents[1]))
    fs = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    before = machine()
    runs = []
    try:
        one_run(args, "background", root / "warm-up")  # first-run costs (allocations, kernel choice) kept out of the rows
        for k in range(args.rounds):
            order = list(MODES)[k % len(MODES):] + list(MODES)[:k % len(MODES)]
            for mode in order:
                runs.append({**one_run(args, mode, root / f"{mode}-{k}".replace(" ", "-")), "round": k})
                print(f"round {k + 1} {mode}: total {runs[-1]['total_s']:.1f} s, stalls "
                      f"{[round(s, 3) for s in runs[-1]['stall_s']]} s", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    table = summarise(runs)
    size = runs[0]["bytes"] / 1e6
    print(f"\n{args.arch}, checkpoint {size:.0f} MB, {args.steps} steps, every {args.every} + end, "
          f"{args.rounds} rounds; file system {fs}")
    print(f"before: {before}\nafter:  {machine()}\n")
    print("| mode | stall per checkpoint, median (max) | write, median | step, no write in flight | "
          "step, write in flight | total, min / median | per periodic checkpoint, vs steps only |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, t in table.items():
        busy = f"{t['step_busy_median_s']:.2f} s" if t["step_busy_median_s"] is not None else "-"
        per = f"{t['per_checkpoint_s']:+.2f} s" if t["per_checkpoint_s"] is not None else "-"
        print(f"| {mode} | {t['stall_median_s']:.2f} s ({t['stall_max_s']:.2f} s) | {t['write_median_s']:.2f} s | "
              f"{t['step_idle_median_s']:.2f} s | {busy} | {t['total_min_s']:.1f} / {t['total_median_s']:.1f} s | {per} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": table, "file_system": fs, "before": before},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
