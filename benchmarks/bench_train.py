"""What does the engine's machinery cost? Engine time per image vs a bare training loop.

Both loops train the same model on the same device-resident batch, so the input pipeline is out of
the picture (`senet bench-train` measures that part: real DALI batches vs a resident one). The engine
side is `training.engine.train_one_epoch` itself: LR schedule per step, per-step reseeding, loss and
finiteness accumulation on the device, data-wait timing, log rows every `--log-every` steps and the
RunControl agreement every 10 steps. The bare side is forward, cross-entropy, zero_grad, backward,
SGD step. Goal: engine within 10 % of bare on CPU.

Timings are interleaved (each repeat runs both, alternating which goes first), so drift on a shared
machine hits both alike. Both the median and the minimum over repeats are reported; on a machine
shared with other jobs the minimum is the better estimate of each loop's own cost (other jobs only
ever add time), and the ratio of minima is the headline number. `--clock cpu` (the default) times
with this process's CPU time instead of wall time, which other jobs on a shared machine barely
touch; with one torch thread (the default) it is the work each loop does.

Usage::

    python benchmarks/bench_train.py                                  # se_resnext_tiny, batch 32 at 64 px, CPU
    python benchmarks/bench_train.py --arch se_resnext50_32x4d --crop 224 --batch-size 256 --device gpu --precision bf16

Measures and prints; never asserts.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.loader import ResidentLoader  # noqa: E402
from training import engine  # noqa: E402
from training.build import Data, build  # noqa: E402
from training.config import load_config  # noqa: E402
from training.ranks import DistInfo  # noqa: E402
from training.placement import place  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="se_resnext_tiny")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time or wall time")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--log-every", type=int, default=10, help="engine log rows (each one syncs)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(None, [f"model.arch={args.arch}", f"model.num_classes={args.classes}", f"train.device={args.device}",
                             f"train.precision={args.precision}", f"train.batch_size={args.batch_size}",
                             f"train.log_every={args.log_every}", "train.checkpoint_every=1000000", "train.epochs=1000"])
    here = place(args.device, precision=cfg.train.precision, threads=args.threads, dist=DistInfo())
    device = here.torch_device
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
    if cfg.model.channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    # The engine's own run, built from parts: a resident batch instead of DALI (see training.build).
    r = build(cfg, here, out, data=Data(tuple(map(str, range(args.classes)))),
              loaders=(ResidentLoader(images, labels, args.batch_size, steps=args.steps), None))
    torch.set_num_threads(args.threads)  # build() gave torch this process's CPU share; the benchmark pins it
    model, optimizer, scaler, precision = r.model, r.optimizer, r.scaler, r.precision
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    kind = type(optimizer).__name__ + (" fused" if optimizer.defaults.get("fused") else "")
    state = engine.TrainState()

    def run_engine() -> float:
        sync()
        t = clock()
        engine.train_one_epoch(r, state)
        sync()
        state.epoch += 1
        return clock() - t

    def run_bare() -> float:
        sync()
        t = clock()
        model.train()
        for _ in range(args.steps):
            with precision.autocast():
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        sync()
        return clock() - t

    run_bare(), run_engine()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    for i in range(args.repeats):
        order = (("engine", run_engine), ("bare", run_bare)) if i % 2 == 0 else (("bare", run_bare), ("engine", run_engine))
        for name, fn in order:
            times[name].append(fn())
    per_run = args.steps * args.batch_size
    per_image = {k: min(v) / per_run for k, v in times.items()}
    median = {k: statistics.median(v) / per_run for k, v in times.items()}
    result: dict[str, Any] = {
        "clock": args.clock,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
                   + (f", {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""),
        "torch": torch.__version__, "arch": args.arch, "batch_size": args.batch_size, "crop": args.crop,
        "device": args.device, "precision": precision.name, "optimizer": kind, "steps": args.steps, "repeats": args.repeats,
        "engine_ms_per_image": per_image["engine"] * 1e3, "bare_ms_per_image": per_image["bare"] * 1e3,
        "engine_over_bare": per_image["engine"] / per_image["bare"],
        "engine_over_bare_median": median["engine"] / median["bare"],
        "engine_overhead_ms_per_step": (per_image["engine"] - per_image["bare"]) * args.batch_size * 1e3,
        "engine_images_per_s": 1 / per_image["engine"], "bare_images_per_s": 1 / per_image["bare"],
        "runs_s": times,
    }
    print(f"{args.arch} batch {args.batch_size} at {args.crop} px on {args.device} ({precision.name}, {result['machine']}): "
          f"engine {result['engine_ms_per_image']:.3f} ms/img, bare {result['bare_ms_per_image']:.3f} ms/img, "
          f"ratio {result['engine_over_bare']:.3f} (minima; medians {result['engine_over_bare_median']:.3f}), "
          f"engine overhead {result['engine_overhead_ms_per_step']:.2f} ms/step")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
