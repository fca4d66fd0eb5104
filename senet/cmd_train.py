"""`senet train` and `senet bench-train`.

`senet train CONFIG --nproc N` starts N local processes of itself, each with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), so each is
exactly what torchrun or a Slurm task would start: a fresh interpreter, which also lets DALI start its
Python workers before anything touches CUDA. `torchrun --nproc-per-node N -m senet train CONFIG`
works the same way. If one process fails, the others are stopped and the first failure's status is
returned; SIGTERM to the launcher is passed on, and each rank answers it with a checkpoint and a
clean stop at the next agreed step boundary.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from senet.console import Failure, UsageError, add_set_options, config_overrides, write_json
from training.config import Config, ConfigError, load_config
from training.run_folder import default_out, save_given_config

log = logging.getLogger("senet.train")

WORKER_ENV = "SENET_TRAIN_WORKER"  # set for processes started by --nproc (they never launch further ones)


def cmd_train(args: argparse.Namespace) -> int:
    from training.build import preflight

    cfg = load_config(args.config, config_overrides(args))
    preflight(cfg)
    out = Path(args.out) if args.out else default_out(args.config)
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be at least 1")
    in_job = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, our launcher, or a Slurm wrapper
    if not in_job:
        from training.virtual import at_start

        at_start(cfg, args.nproc, 0)  # --nproc must divide the virtual ranks the config asks for (a resume: the run's)
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


def train_here(cfg: Config, out: Path, resume: str) -> int:
    """Run this process as one rank (from the environment) and print the summary on rank 0."""
    from training.checkpoint import CheckpointError, ResumeError
    from training.control import RunControl
    from training.engine import NonFiniteLoss, run
    from training.health import RankFailure
    from training.placement import place_run

    place = place_run(cfg)
    dist = place.dist
    if not dist.is_main:
        logging.getLogger("senet").setLevel(logging.WARNING)  # one voice: rank 0 reports progress
    control = RunControl()
    signal.signal(signal.SIGTERM, lambda *_: control.request_checkpoint(stop=True))
    try:
        summary = run(cfg, place, out, resume=None if resume == "none" else resume, control=control)
    except ResumeError as e:  # checkpoints exist but none verifies: never a silent fresh start
        if not dist.is_main:
            return 2
        raise UsageError(str(e)) from None
    except RankFailure as e:  # another rank hung, died or failed; the rank that named it logged the line
        if os.environ.get(WORKER_ENV) or not e.claimed:
            return 1  # `--nproc`'s launcher says it last
        raise Failure(str(e)) from None
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
        ema = f", weight EMA top-1 {summary['val_top1_ema']:.4f}" if "val_top1_ema" in summary else ""
        best = f"best {summary['best_top1']:.4f}" + (", the EMA's" if summary.get("best_weights") == "ema" else "")
        val = (f", val top-1 {summary['val_top1']:.4f} top-5 {summary['val_top5']:.4f}{ema} ({best})"
               if "val_top1" in summary else "")
        print(f"{how}: {summary['step']} steps, epoch {summary['epoch']}{val}; waited for data "
              f"{summary['data_wait_fraction']:.1%} of the training time; {summary['checkpoint']}")
    return 0


def launch_local(args: argparse.Namespace, out: Path) -> int:
    """Start `--nproc` ranks of this command on this machine and wait for them.

    A rank that hung or died cannot say so itself: the rank that named it left a verdict in the run
    folder, and its line is the launcher's last (exit 1).
    """
    from training.health import RUN_ID_ENV, read_verdict, session_folder
    from training.launch import launch_ranks

    command = [sys.executable, "-m", "senet", "train", args.config, "--out", str(out), "--resume", args.resume]
    if args.set_file:
        command += ["--set-file", str(Path(args.set_file).resolve())]
    for item in args.set:
        command += ["--set", item]
    run_id = uuid.uuid4().hex[:12]
    code = launch_ranks(command, args.nproc, {WORKER_ENV: "1", RUN_ID_ENV: run_id})
    verdict = read_verdict(session_folder(out, run_id)) if code else None
    if verdict is not None and verdict.kind != "error":  # a rank's own exception: that rank said it
        raise Failure(verdict.message)
    return code


# ---------------------------------------------------------------------------------------- bench-train
def cmd_bench_train(args: argparse.Namespace) -> int:
    from training.build import preflight
    from training.throughput import bench_train

    cfg = load_config(args.config, config_overrides(args))
    preflight(cfg)
    if args.batches < 2:
        raise UsageError(f"--batches {args.batches}: must be at least 2")
    result = bench_train(cfg, args.batches, warmup=args.warmup)
    write_json(args.json, result)
    print(f"{result['arch']} on {result['device']} ({result['precision']}), batch {result['batch_size']}: "
          f"real data {result['real_step_s'] * 1e3:.1f} ms/step ({result['real_images_per_s']:.0f} img/s), "
          f"synthetic {result['synthetic_step_s'] * 1e3:.1f} ms/step ({result['synthetic_images_per_s']:.0f} img/s); "
          f"data-stall fraction {result['data_stall_fraction']:.1%} (time waiting for batches {result['data_wait_fraction']:.1%})")
    print(result["verdict"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `bench-train` to the `senet` parser."""
    p = sub.add_parser("train", help="train on this machine (N local processes)")
    p.add_argument("config", help="YAML config (sections model, data, optim, train, slurm)")
    add_set_options(p)
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, nccl on GPU)")
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="auto: continue from the newest checkpoint in OUT/checkpoints that verifies (exit 2 when "
                        "some exist but none does); PATH: that checkpoint; none: start fresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench-train", help="step time with real DALI batches vs a synthetic resident batch, and "
                       "whether the input or the model sets the pace")
    p.add_argument("config", help="YAML config")
    add_set_options(p)
    p.add_argument("--batches", type=int, default=50, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--json", help="write the results as JSON")
    p.set_defaults(func=cmd_bench_train)
