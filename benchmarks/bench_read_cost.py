"""Host CPU per image of the input stages (`read`, and `full` to see that no work merely moved): this
checkout against another one, interleaved in one run.

`read` is all per-sample host work before the decoder: file bytes, byte screen, header size,
augmentation draws, warp geometry and colour parameters, and DALI taking them in. Its CPU time per
image (this process and its DALI workers, from /proc) bounds how many images per second a rank's
cores can feed a GPU, before any decoding.

Each repeat runs `senet bench-input DATA --stages read,full` once with each checkout's code (PYTHONPATH),
alternating which goes first, so load on a shared machine hits both alike; the minimum over repeats
is each side's own cost (other jobs only add time).

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/bench_read_cost.py DATA --other /tmp/before --json read_cost.json

Measures and prints; never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def stage_costs(code: Path, data: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        entry = "senet" if (code / "senet" / "__main__.py").is_file() else "training"  # the command's older home
        cmd = [sys.executable, "-m", entry, "bench-input", data, "--stages", args.stages, "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--threads", "1", "--py-workers", str(args.py_workers),
               "--warmup", "5", "--json", out.name, "--cache-dir", args.cache_dir]
        env = {**os.environ, "PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"}
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=code)
        result = json.loads(Path(out.name).read_text())
    return {stage: {"images_per_s": result["stages"][stage], "cpu_ms_per_image": result["cpu_ms_per_image"][stage]}
            for stage in args.stages.split(",")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a data tree (ILSVRC root or class folders)")
    p.add_argument("--other", required=True, help="the other checkout (e.g. a worktree of the commit before)")
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stages", default="read,full", help="comma-separated bench-input stages")
    p.add_argument("--py-workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=tempfile.mkdtemp(prefix="read_cost_"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    sides = {"this": HERE, "other": Path(args.other).resolve()}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(args.repeats):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            runs[name].append(stage_costs(sides[name], args.data, args))
            print(f"repeat {i + 1} {name}: {runs[name][-1]}", flush=True)
    stages = args.stages.split(",")
    best = {stage: {k: min(r[stage]["cpu_ms_per_image"] for r in v) for k, v in runs.items()} for stage in stages}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "data": args.data,
              "batch_size": args.batch_size, "batches": args.batches, "py_workers": args.py_workers,
              "this": str(sides["this"]), "other": str(sides["other"]), "runs": runs, "cpu_ms_per_image_min": best,
              "cpu_ms_per_image_median": {stage: {k: statistics.median(r[stage]["cpu_ms_per_image"] for r in v)
                                                  for k, v in runs.items()} for stage in stages},
              "this_over_other": {stage: best[stage]["this"] / best[stage]["other"] for stage in stages}}
    for stage in stages:
        print(f"{stage}: CPU ms per image (min of {args.repeats}): this {best[stage]['this']:.4f}, "
              f"other {best[stage]['other']:.4f}, ratio {result['this_over_other'][stage]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
