"""`senet submit`, `senet jobs`, `senet logs`, `senet cancel`: training runs as Slurm jobs.

The work is `slurm.submit` (run folder, sbatch parameters, submitit) and `slurm.queue` (squeue, sacct,
scancel); Slurm's client commands read SLURM_CONF from the environment.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from senet.console import Failure, UsageError, add_set_options, config_overrides, write_json
from training.config import Config, load_config

POLL_S = 0.5  # --follow: how often logs and the job's state are read
NOT_HERE = " (as this host sees it; --no-preflight submits anyway, for data that only the compute nodes see)"


def cmd_submit(args: argparse.Namespace) -> int:
    from slurm.client import SubmitError
    from slurm.options import apply_cli
    from slurm.sbatch import check_job_config, sbatch_script, tasks_per_node
    from slurm.submit import submit
    from training.build import preflight

    if args.resume:
        return resubmit(args)
    if not args.config:
        raise UsageError("give a CONFIG to submit, or --resume RUN_DIR to continue a run")
    overrides = apply_cli(config_overrides(args), args.nodes, args.gpus_per_node, args.partition, args.time,
                          args.account, args.qos, args.out)
    cfg = load_config(args.config, overrides)
    check_job_config(cfg)
    root = Path(cfg.slurm.output_root)
    if args.dry_run:
        run_dir = root / f"{Path(args.config).stem}-<UTC time>"
        print(sbatch_script(cfg, run_dir), end="")
        print(f"# dry run: nothing submitted; the run folder would be {run_dir}", file=sys.stderr)
        return 0
    if not args.no_preflight:  # what `senet train` would reject in its first second, refused before the queue
        preflight(cfg, NOT_HERE)
    say_preemption(cfg, None)
    try:
        job = submit(cfg, args.config, root, command=sys.argv)
    except SubmitError as e:
        raise Failure(str(e)) from None
    write_json(args.json, {"job_id": job.job_id, "run_dir": str(job.run_dir)})
    s = cfg.slurm
    out, err = job.log_paths(0)
    print(f"submitted job {job.job_id}: {s.nodes} node(s) x {tasks_per_node(cfg)} task(s)"
          f"{f', {s.gpus_per_node} GPUs per node' if s.gpus_per_node else ''}, partition {s.partition or '(default)'}, "
          f"{s.time_min} min per allocation")
    print(f"run folder: {job.run_dir}")
    print(f"logs:       {err} (rank 0; {out.name} for its stdout, {job.job_id}_<rank>_log.* for the others)")
    print(f"follow it:  senet logs {job.job_id} --follow")
    return 0


def resubmit(args: argparse.Namespace) -> int:
    """`senet submit --resume RUN_DIR [--nodes N] [--gpus-per-node G] ...`: the run folder's config and code, a new
    job resuming from its newest checkpoint that verifies, on the run's shape or the one the flags give."""
    from slurm.client import SubmitError
    from slurm.job_folder import RunFolderError
    from slurm.options import apply_cli
    from slurm.submit import resubmit as resubmit_run
    from training.build import preflight
    from training.run_folder import CONFIG

    given = [flag for flag, value in (("CONFIG", args.config), ("--set", args.set), ("--set-file", args.set_file),
                                      ("--out", args.out)) if value]
    if given:
        raise UsageError(f"--resume continues a run with the config it holds (--nodes, --gpus-per-node, --partition, "
                         f"--time, --account and --qos may change where it runs); drop {', '.join(given)}")
    shape = apply_cli([], args.nodes, args.gpus_per_node, args.partition, args.time, args.account, args.qos, None)
    run_dir = Path(args.resume)
    try:
        if (run_dir / CONFIG).is_file():
            cfg = load_config(run_dir / CONFIG, shape)
            if not args.no_preflight:
                preflight(cfg, NOT_HERE)
            say_preemption(cfg, run_dir)
        job, found = resubmit_run(run_dir, command=sys.argv, shape=shape)
    except RunFolderError as e:
        raise UsageError(str(e)) from None
    except SubmitError as e:
        raise Failure(str(e)) from None
    step = found.candidate.step
    write_json(args.json, {"job_id": job.job_id, "run_dir": str(job.run_dir), "resumed_from_step": step})
    if found.note:
        print(found.note)
    print(f"submitted job {job.job_id}: continues {job.run_dir} from step {step} "
          f"(checkpoints/{found.candidate.path.name}){on_shape(job.run_dir, found.candidate.path) if shape else ''}")
    print(f"follow it:  senet logs {job.job_id} --follow")
    return 0


def on_shape(run_dir: Path, checkpoint: Path) -> str:
    """' on 2 node(s) x 8 tasks, 2 of its 32 virtual ranks per process': the shape the run's new job asked for."""
    from slurm.job_folder import read_job_file
    from training.checkpoint import peek_checkpoint
    from training.virtual import started_with

    info = read_job_file(run_dir)
    world = info["nodes"] * info["tasks_per_node"]
    virtual = started_with(peek_checkpoint(checkpoint))
    return (f" on {info['nodes']} node(s) x {info['tasks_per_node']} tasks, {virtual // world} of its {virtual} "
            f"virtual ranks per process")


def say_preemption(cfg: Config, run_dir: Path | None) -> None:
    """One line: how a preemption of this job will be survived (slurm.preemption); exit 2 where nothing can work."""
    from slurm.client import SlurmError
    from slurm.preemption import RunTimes, plan, read_partition

    try:
        partition, cluster = read_partition(cfg.slurm.partition)
    except SlurmError:
        return  # sbatch says what is wrong with the partition or the cluster
    found = plan(partition, cluster, cfg, RunTimes.read(run_dir))
    if found.fatal:
        raise UsageError(found.fatal)
    print(found.line)
    for warning in found.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_demo_preemption(args: argparse.Namespace) -> int:
    """The demo's Slurm part (slurm.demo): the reference run as a job, preempted mid-run, compared bit for bit."""
    from slurm import demo
    from slurm.client import SlurmError, SubmitError
    from slurm.sbatch import check_job_config
    from training.build import preflight

    cfg = load_config(args.config, [f"slurm.partition={args.partition}"])
    check_job_config(cfg)
    preflight(cfg, NOT_HERE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        r = demo.preempted_run(cfg, Path(args.config), Path(args.reference), out)
    except (SubmitError, SlurmError, TimeoutError) as e:
        raise Failure(str(e)) from None
    print(f"job {r['job_id']}: {' -> '.join(r['states'])}; preempted at step {r['preempted_at']}, resumed from step(s) "
          f"{r['resumed_at']}, {r['requeues']} requeue(s); run folder {r['run_dir']}")
    verdict = "bit-identical to" if r["identical"] else "DIFFERENT from"
    print(f"final parameters (step {r['steps']['slurm']}) {verdict} the local run's (step {r['steps']['local']}): "
          f"sha256 {r['digests']['slurm'][:16]}... vs {r['digests']['local'][:16]}...")
    if not r["requeued"]:
        print(f"job {r['job_id']} was NOT preempted and resumed (states {' -> '.join(r['states'])}): the demo "
              f"showed nothing", file=sys.stderr)
    return 0 if r["identical"] and r["requeued"] else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from slurm import queue
    from slurm.client import SlurmError
    from slurm.recovery import run_notes

    try:
        jobs = queue.list_jobs()
    except SlurmError as e:
        raise Failure(str(e)) from None
    if not jobs:
        print(f"no senet jobs since {queue.HISTORY}")
        return 0
    notes: dict[str, str] = {}
    for run_dir in {j.run_dir for j in jobs}:
        if Path(run_dir).is_dir():
            notes.update(run_notes(Path(run_dir)))
    width = max(len(j.job_id) for j in jobs)
    print(f"{'JOB':<{width}}  {'STATE':<11} {'ELAPSED':>10} NODES  RUN FOLDER")
    for j in jobs:
        note = f"  {notes[j.job_id]}" if j.job_id in notes else ""
        print(f"{j.job_id:<{width}}  {j.state:<11} {j.elapsed:>10} {j.nodes:>5}  {j.run_dir}{note}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from slurm import queue
    from slurm.client import SlurmError
    from slurm.job_folder import LOGS, log_paths

    try:
        run_dir = queue.run_dir_of(args.job)
    except SlurmError as e:
        raise Failure(str(e)) from None
    paths = [p for p, wanted in zip(log_paths(run_dir, args.job, args.rank), ("out", "err"))
             if args.stream in (wanted, "both")]
    if not any(p.exists() for p in paths):
        present = sorted({int(p.name.split("_")[1]) for p in (run_dir / LOGS).glob(f"{args.job}_*_log.*")})
        if present:
            raise Failure(f"job {args.job} has no rank {args.rank}; its ranks: {', '.join(map(str, present))}")
        if not args.follow:
            print(f"job {args.job} ({queue.job_state(args.job) or 'state unknown'}) has written no log yet; "
                  f"it will be at {paths[-1]}")
            return 0
    offsets = {p: 0 for p in paths}
    while True:
        for p in paths:
            offsets[p] = show_new(p, offsets[p], label=len(paths) > 1)
        if not args.follow:
            return 0
        if queue.job_state(args.job) not in queue.ACTIVE:
            for p in paths:  # what was written while we looked at the state
                offsets[p] = show_new(p, offsets[p], label=len(paths) > 1)
            return 0
        time.sleep(POLL_S)


def show_new(path: Path, offset: int, label: bool) -> int:
    """Print what `path` holds past `offset` (headed by its name when several files are shown); new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    if data:
        if label:
            print(f"==> {path} <==")
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def cmd_cancel(args: argparse.Namespace) -> int:
    from slurm import queue
    from slurm.client import SlurmError

    try:
        run_dir = queue.run_dir_of(args.job)
        queue.cancel(args.job)
    except SlurmError as e:
        raise Failure(str(e)) from None
    print(f"cancelled job {args.job}; its run folder {run_dir} keeps the last checkpoint")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `submit`, `jobs`, `logs` and `cancel` to the `senet` parser."""
    p = sub.add_parser("submit", help="run a training config as a Slurm job (submitit; requeued on timeout/preemption)")
    p.add_argument("config", nargs="?", help="YAML config; its `slurm` section sizes the job")
    add_set_options(p)
    p.add_argument("--out", metavar="ROOT", help="shared folder for the run folder (default slurm.output_root)")
    p.add_argument("--nodes", type=int, help="servers (slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per server = tasks per server (slurm.gpus_per_node)")
    p.add_argument("--partition", metavar="P", help="Slurm partition (slurm.partition)")
    p.add_argument("--time", metavar="T", help="time limit per allocation: minutes or [days-]hh:mm:ss (slurm.time_min)")
    p.add_argument("--account", metavar="A", help="Slurm account (slurm.account)")
    p.add_argument("--qos", metavar="Q", help="Slurm QOS (slurm.qos)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run of this run folder (its job has ended) from "
                   "its newest checkpoint that verifies, with its own config and code; --nodes and --gpus-per-node "
                   "give it another shape (the process count must divide the run's virtual ranks)")
    p.add_argument("--no-preflight", action="store_true", help="skip the checks of data.root, the model and the "
                   "class count on this host (for data that only the compute nodes see)")
    p.add_argument("--json", metavar="F", help="write {job_id, run_dir} as JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo-preemption", help="(make demo) run CONFIG as a Slurm job, preempt it mid-run, compare "
                       "its final parameters with a local run's")
    p.add_argument("config", help="the config of the local run")
    p.add_argument("--reference", required=True, metavar="RUN", help="the local run folder to compare with")
    p.add_argument("--out", required=True, metavar="DIR", help="where slurm.json and resume.json go")
    p.add_argument("--partition", default="debug", help="a preemptible partition (the local cluster's `debug`)")
    p.set_defaults(func=cmd_demo_preemption)

    p = sub.add_parser("jobs", help="this user's senet jobs, their states and what happened to their runs (a "
                       "failure and where the run went on, why it stopped, a slow rank)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", help="a rank's log of a senet job")
    p.add_argument("job", help="Slurm job id")
    p.add_argument("--rank", type=int, default=0, help="global rank (default 0, the one that reports progress)")
    p.add_argument("--stream", choices=("err", "out", "both"), default="both",
                   help="err: the log (stderr), out: printed output, both (default)")
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends (requeues included)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a senet job")
    p.add_argument("job", help="Slurm job id")
    p.set_defaults(func=cmd_cancel)
