"""`senet train` and `senet bench-train`.

`senet train CONFIG --nproc N` starts N local processes of itself, each with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), so each is
exactly what torchrun or a Slurm task would start: a fresh interpreter, which also lets DALI start its
Python workers before anything touches CUDA. `torchrun --nproc-per-node N -m training train CONFIG`
works the same way. If one process fails, the others are stopped and the first failure's status is
returned; SIGTERM to the launcher is passed on, and each rank answers it with a checkpoint and a
clean stop at the next agreed step boundary.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from training.cli import Failure, UsageError, write_json
from training.config import Config, ConfigError, load_config

log = logging.getLogger("senet.train")

WORKER_ENV = "SENET_TRAIN_WORKER"  # set for processes started by --nproc (they never launch further ones)
GIVEN_CONFIG = "config.given.yaml"  # the config file as the user wrote it; config.yaml is the resolved one


def default_out(config: str) -> Path:
    """runs/<config name>: a rerun of the same command resumes the same run."""
    return Path("runs") / Path(config).stem


def cmd_train(args: argparse.Namespace) -> int:
    from training.engine import preflight

    cfg = load_config(args.config, args.set)
    preflight(cfg)
    out = Path(args.out) if args.out else default_out(args.config)
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be at least 1")
    in_job = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, our launcher, or a Slurm wrapper
    if args.nproc > 1 and not in_job:
        if cfg.train.device == "gpu":
            from training.placement import gpu_count

            if args.nproc > gpu_count():  # NVML: does not initialise the CUDA driver here
                raise UsageError(f"--nproc {args.nproc} with train.device=gpu needs {args.nproc} GPUs, one per process; "
                                 f"this machine shows {gpu_count()} (use train.device=cpu for gloo processes)")
        save_given_config(args.config, out)
        return launch_local(args, out)
    if not in_job:
        save_given_config(args.config, out)
    return train_here(cfg, out, args.resume)


def save_given_config(config: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / GIVEN_CONFIG)


def train_here(cfg: Config, out: Path, resume: str) -> int:
    """Run this process as one rank (from the environment) and print the summary on rank 0."""
    from training.checkpoint import CheckpointError
    from training.engine import NonFiniteLoss, RunControl, run
    from training.placement import place_run

    place = place_run(cfg)
    dist = place.dist
    if not dist.is_main:
        logging.getLogger("senet").setLevel(logging.WARNING)  # one voice: rank 0 reports progress
    control = RunControl()
    signal.signal(signal.SIGTERM, lambda *_: control.request_checkpoint(stop=True))
    try:
        summary = run(cfg, place, out, resume=None if resume == "none" else resume, control=control)
    except (NonFiniteLoss, CheckpointError) as e:
        if not dist.is_main:
            return 1  # every rank knows; rank 0 says it once
        raise Failure(str(e)) from None
    except ConfigError:
        if not dist.is_main:
            return 2
        raise
    if dist.is_main:
        how = "stopped at a requested checkpoint" if summary["stopped"] else "finished"
        val = (f", val top-1 {summary['val_top1']:.4f} top-5 {summary['val_top5']:.4f} (best {summary['best_top1']:.4f})"
               if "val_top1" in summary else "")
        print(f"{how}: {summary['step']} steps, epoch {summary['epoch']}{val}; {summary['checkpoint']}")
    return 0


def launch_local(args: argparse.Namespace, out: Path) -> int:
    """Start `--nproc` ranks of this command on this machine and wait for them."""
    from pipeline.processes import become_subreaper, kill_children
    from training.launch import launch_ranks

    command = [sys.executable, "-m", "training", "train", args.config, "--out", str(out), "--resume", args.resume]
    for item in args.set:
        command += ["--set", item]
    become_subreaper()
    try:
        return launch_ranks(command, args.nproc, {WORKER_ENV: "1"})
    finally:
        kill_children()  # whatever a killed rank left behind (its DALI workers) was adopted by us


# ---------------------------------------------------------------------------------------- bench-train
def cmd_bench_train(args: argparse.Namespace) -> int:
    from training.engine import preflight

    cfg = load_config(args.config, args.set)
    preflight(cfg)
    if args.batches < 2:
        raise UsageError(f"--batches {args.batches}: must be at least 2")
    result = bench_train(cfg, args.batches, warmup=args.warmup)
    write_json(args.json, result)
    print(f"{result['arch']} on {result['device']} ({result['precision']}), batch {result['batch_size']}: "
          f"real data {result['real_step_s'] * 1e3:.1f} ms/step ({result['real_images_per_s']:.0f} img/s), "
          f"synthetic {result['synthetic_step_s'] * 1e3:.1f} ms/step ({result['synthetic_images_per_s']:.0f} img/s); "
          f"data-stall fraction {result['data_stall_fraction']:.1%} (time waiting for batches {result['data_wait_fraction']:.1%})")
    return 0


def bench_train(cfg: Config, batches: int, warmup: int = 3) -> dict[str, Any]:
    """Step time with real DALI batches vs one synthetic batch resident on the device (one process).

    The data-stall fraction is 1 - synthetic / real step time: the share of a real step that the
    input pipeline adds. Both loops are the engine's own `train_step` on the same model.
    """
    import torch

    from training import dist as distmod
    from training import engine
    from training.dist import DistInfo
    from training.optim import LRSchedule, build_optimizer
    from training.placement import place_run

    place = place_run(cfg, DistInfo())
    engine.configure_process(place)
    data = engine.load_data(cfg)
    loader, _ = engine.build_loaders(cfg, place, engine.Data(data.train, None, data.exclude))
    try:
        distmod.init_distributed(place, cfg.train.dist_timeout_s)  # selects the GPU; one process: no group
        device, precision = place.torch_device, place.precision
        model = engine.build_model(cfg, device)
        optimizer, _ = build_optimizer(model, cfg.optim, place.device)
        for group in optimizer.param_groups:
            group["lr"] = LRSchedule(cfg.optim, cfg.train.batch_size, 1, 1).peak
        scaler = precision.grad_scaler()
        if cfg.train.compile:
            model = torch.compile(model)
        model.train()
        step = lambda x, y: engine.train_step(model, x, y, optimizer, scaler, precision, cfg.optim.label_smoothing)  # noqa: E731
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        epoch = 0
        loader.set_epoch(epoch)
        it, wait, fixed = iter(loader), 0.0, None
        for n in range(warmup + batches):
            if n == warmup:
                sync()
                start, wait = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:  # a short epoch: continue with the next one
                epoch += 1
                loader.set_epoch(epoch)
                it = iter(loader)
                batch = next(it)
            wait += time.perf_counter() - t0
            x, y = engine.prepare_batch(*batch, precision, cfg.data.layout)
            fixed = fixed or (x.clone(), y.clone())
            step(x, y)
        sync()
        real = (time.perf_counter() - start) / batches

        for n in range(warmup + batches):
            if n == warmup:
                sync()
                start = time.perf_counter()
            step(*fixed)
        sync()
        synthetic = (time.perf_counter() - start) / batches
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        loader.close()
    b = cfg.train.batch_size
    return {"arch": cfg.model.arch, "device": place.device, "precision": precision.name, "batch_size": b,
            "channels_last": bool(cfg.model.channels_last and place.device == "gpu"), "layout": cfg.data.layout,
            "compile": cfg.train.compile, "batches": batches, "crop_size": cfg.data.crop_size, "real_step_s": real,
            "synthetic_step_s": synthetic, "real_images_per_s": b / real, "synthetic_images_per_s": b / synthetic,
            "data_stall_fraction": max(0.0, 1.0 - synthetic / real), "data_wait_fraction": wait / (real * batches),
            "max_memory_gib": peak, "placement": place.describe()}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `bench-train` to the `senet` parser."""
    p = sub.add_parser("train", help="train on this machine (N local processes)")
    p.add_argument("config", help="YAML config (sections model, data, optim, train, slurm)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.epochs=3")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, nccl on GPU)")
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="auto: continue from OUT/checkpoints/last.pt when present; PATH: that checkpoint; none: start fresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench-train", help="step time with real DALI batches vs a synthetic resident batch")
    p.add_argument("config", help="YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    p.add_argument("--batches", type=int, default=50, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--json", help="write the results as JSON")
    p.set_defaults(func=cmd_bench_train)
