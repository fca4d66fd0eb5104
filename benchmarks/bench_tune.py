"""`senet bench-input --tune` on ImageNet-like JPEGs, with the machine named: a section for RESULTS_input.md.

    python benchmarks/bench_tune.py [--data DIR] [--images 1024] [--device cpu|gpu] [--cpus N] [--batch-size 64]
                                    [--batches 10] [--repeats 3] [--budget-s 900] [--out DIR]

Writes (once) a tree of 500x375 quality-90 photographs (~100 KB, gpu_check's generator), runs the
command as a user runs it (`senet bench-input DATA --tune ...`, a subprocess), and prints a Markdown
section: the machine (lscpu model, cores, load averages before and after), the settings, every
candidate best first with its interleaved runs and spread, the defaults, the noise and the verdict.
Never asserts: the numbers go to benchmarks/RESULTS_input.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_input import cpu_model  # noqa: E402
from benchmarks.gpu_sections import photo_tree  # noqa: E402


def markdown(report: dict, machine: str, load: tuple[list[float], list[float]], command: list[str]) -> str:
    """The section: machine, command, the table best first, the verdict."""
    names = list(report["default"]["settings"])
    lines = [f"Machine: {machine}; load average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load[0])} before, "
             f"{'/'.join(f'{v:.1f}' for v in load[1])} after.",
             f"Data: {report['images']} ImageNet-like JPEGs (500x375, quality 90), page-cached; {report['device']}, a "
             f"{report['cpus']}-CPU share, batch {report['batch_size']}, crop {report['crop_size']}; each run = the "
             f"`full` stage over {report['batches']} batches after a warm-up; {report['repeats']} interleaved runs per "
             f"candidate and stage; {report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget.", "",
             f"`{' '.join(command)}`", "",
             "| " + " | ".join(names) + " | images/s (median) | spread (max - min) | runs |  |",
             "| " + " | ".join("---:" for _ in names) + " | ---: | ---: | --- | --- |"]
    best = report["best"]["settings"]
    for c in report["candidates"]:
        mark = ", ".join(m for m, on in (("**defaults**", c["default"]),
                                        ("**recommended**", report["recommended_change"] and c["settings"] == best))
                         if on)
        lines.append("| " + " | ".join(f"{c['settings'][n]:g}" for n in names) + f" | {c['images_per_s']:,.0f} | "
                     f"{c['spread']:,.0f} | {', '.join(f'{r:,.0f}' for r in c['runs'])} | {mark} |")
    gain, noise = report["gain_images_per_s"], report["noise_images_per_s"]
    verdict = ("recommended: the fastest beats the defaults by more than the noise" if report["recommended_change"]
               else "the defaults stay: no candidate beats them by more than the noise")
    ratio = report["fastest"]["images_per_s"] / report["default"]["images_per_s"]
    lines += ["", f"Fastest vs defaults: {gain:+,.0f} img/s ({ratio:.2f}x); noise {noise:,.0f} img/s (the larger "
              f"spread of the two): {verdict}."]
    lines += [f"Not measured: {s}." for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/senet-bench-tune")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus", type=int, default=None, help="the share to search (default: this process's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=900)
    p.add_argument("--out", default="/tmp/senet-bench-tune-out")
    args = p.parse_args()
    data = photo_tree(Path(args.data), args.images, args.classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ["senet", "bench-input", str(data), "--tune", "--device", args.device, "--batch-size",
               str(args.batch_size), "--batches", str(args.batches), "--repeats", str(args.repeats), "--budget-s",
               str(args.budget_s), "--json", str(out / "tune.json"), "--set-out", str(out / "tuned.set"),
               "--cache-dir", str(out / "cache")] + (["--cpus", str(args.cpus)] if args.cpus else [])
    before = list(os.getloadavg())
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = list(os.getloadavg())
    if done.returncode != 0:
        sys.exit(done.returncode)
    report = json.loads((out / "tune.json").read_text())
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs visible, host {report['host']}"
    print()
    print(markdown(report, machine, (before, after), command))


if __name__ == "__main__":
    main()
