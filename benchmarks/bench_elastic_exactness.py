"""How far a run that changes its number of processes drifts from one that never did, by torch thread setting.

    python benchmarks/bench_elastic_exactness.py [--out DIR] [--json F]

`senet train` on the CPU (gloo), a tiny SE-ResNeXt on synthetic JPEGs, a global batch of 16 (2 virtual
ranks of 8), 3 epochs of 6 steps. For each thread setting: the run on 2 processes uninterrupted, and the
same run SIGKILLed once a checkpoint inside its second epoch has landed and resumed on ONE process (which
then hosts both virtual ranks). The final weights of the two are compared tensor by tensor.

- `train.torch_threads=1`: every process runs torch on one thread, whatever its number.
- default (null): each process takes its CPU share, so the resumed single process runs on more threads than
  each of the two did; torch's CPU convolution backward splits its sums by thread, so its gradients differ
  in the last bits, and training carries the difference on.

Reported: tensors that differ, the largest absolute difference, and the largest relative one (L2 norm of
the difference over the tensor's), per setting. The machine is named in the output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.synthetic import SyntheticSpec, make_synthetic
from training.metrics import read_metrics

RECIPE = ("model.arch=se_resnext_tiny", "model.channels_last=false", "model.num_classes=4", "train.seed=5",
          "train.device=cpu", "train.precision=fp32", "data.dtype=float32", "data.py_workers=0", "data.threads=1",
          "data.crop_size=32", "data.samples_per_epoch=96", "train.epochs=3", "train.checkpoint_every=4",
          "train.log_every=1", "optim.lr=0.2", "optim.reference_batch=16", "optim.warmup_epochs=1",
          "optim.step_epochs=2", "train.batch_size=8")
PER_EPOCH, STEPS = 6, 18
SETTINGS = {"train.torch_threads=1": ["train.torch_threads=1"], "default (the CPU share)": []}


def train(config: Path, data: Path, out: Path, nproc: int, sets: list[str], **popen: Any) -> subprocess.Popen:
    args = [a for s in (*RECIPE, f"data.root={data}", f"data.cache_dir={out.parent / 'cache'}", *sets)
            for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "senet", "train", str(config), "--nproc", str(nproc), "--out",
                             str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen) -> None:
    said, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"senet train failed (exit {proc.returncode}):\n{said[-3000:]}")


def checkpoint_after(out: Path, step: int) -> bool:
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return any(r.get("event") == "checkpoint" and r["step"] > step for r in rows)


def killed_then_resumed(config: Path, data: Path, out: Path, sets: list[str]) -> int:
    """2 processes, SIGKILLed inside the second epoch, then resumed on 1; the step it was killed at."""
    proc = train(config, data, out, 2, sets, start_new_session=True)
    deadline = time.monotonic() + 600
    while not checkpoint_after(out, PER_EPOCH) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    step = int(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"])
    finish(train(config, data, out, 1, sets))
    return step


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    floats = [k for k in a if a[k].is_floating_point()]
    abs_diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in floats}
    rel = {k: (a[k].double() - b[k].double()).norm().item() / max(a[k].double().norm().item(), 1e-30) for k in floats}
    return {"tensors": len(floats), "differing": sum(d > 0 for d in abs_diff.values()),
            "max_abs_diff": max(abs_diff.values()), "max_rel_l2_diff": max(rel.values())}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the data and the runs (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="senet-exactness-"))
    data, config = base / "data", base / "empty.yaml"
    make_synthetic(data, SyntheticSpec(classes=4, train_per_class=20, val_per_class=4, test=0, seed=2, min_side=40,
                                       max_side=64))
    config.write_text("{}\n")
    results = []
    for name, sets in SETTINGS.items():
        whole, part = base / f"whole-{len(results)}", base / f"part-{len(results)}"
        finish(train(config, data, whole, 2, sets))
        killed_at = killed_then_resumed(config, data, part, sets)
        results.append({"setting": name, "killed_at": killed_at, "steps": STEPS, **compare(whole, part)})
    print(f"machine: {machine()}")
    print("| torch threads | killed at step (of 18) | tensors differing | max abs diff | max relative L2 diff |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['setting']} | {r['killed_at']} | {r['differing']} / {r['tensors']} | {r['max_abs_diff']:.3g} | "
              f"{r['max_rel_l2_diff']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
