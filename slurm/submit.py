"""Submitting a training run as a Slurm job through submitit, and continuing a run whose job has ended.

`submit` makes the run folder (`slurm.job_folder`) and hands the sbatch parameters (`slurm.sbatch`) and a
`slurm.job.TrainJob` to submitit; `resubmit` continues such a run folder with a new job, on the same shape
or another (`--nodes`, `--gpus-per-node`): any number of processes that divides the run's virtual ranks
(`training.virtual`) continues the same run. The job itself goes back to the submission folder, so
relative paths in the config mean what they mean to `senet train`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from slurm.client import SubmitError
from slurm.job import TrainJob
from slurm.job_folder import RunFolderError, add_job, log_paths, now, prepare_run_dir, read_job_file, write_job_file
from slurm.queue import ACTIVE, job_state
from slurm.sbatch import check_job_config, sbatch_job, tasks_per_node
from training.checkpoint import CheckpointError, peek_checkpoint
from training.checkpoint_folder import Found, newest_usable, verify_candidate
from training.config import Config, dump_yaml, load_config
from training.run_folder import CHECKPOINTS, CONFIG
from training.virtual import say_sizes, started_with


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_dir: Path

    def log_paths(self, rank: int = 0) -> tuple[Path, Path]:
        """stdout and stderr of one rank (submitit's names)."""
        return log_paths(self.run_dir, self.job_id, rank)


def submit(cfg: Config, config_path: str | Path, root: Path, command: list[str] | None = None) -> Submitted:
    """Create the run folder and submit `cfg` as one Slurm job through submitit.

    Args:
        cfg: the resolved configuration (its `slurm` section sizes the job).
        config_path: the config file as given (copied into the run folder).
        root: the output root; must be on storage every node sees.
        command: the command line, recorded in job.json.

    Returns:
        The job id and the run folder.

    Raises:
        ConfigError: inconsistent `slurm` settings. SubmitError: sbatch refused the job (one line).
    """
    check_job_config(cfg)
    _need_sbatch()
    run_dir = prepare_run_dir(cfg, config_path, root)
    try:
        job_id = _sbatch(cfg, run_dir, Path.cwd())
    except SubmitError:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing was submitted: leave no half run folder behind
        raise
    info = {"job_id": job_id, "run_dir": str(run_dir), "submitted": now(), "workdir": str(Path.cwd()),
            "command": command or [], "nodes": cfg.slurm.nodes, "tasks_per_node": tasks_per_node(cfg),
            "gpus_per_node": cfg.slurm.gpus_per_node, "jobs": [job_id]}
    write_job_file(run_dir, info)
    return Submitted(job_id, run_dir)


def resubmit(run_dir: Path, command: list[str] | None = None,
             shape: Sequence[str | tuple[str, str]] = ()) -> tuple[Submitted, Found]:
    """Continue a run whose job has ended (time limit after its last requeue, cancelled, node failure).

    The new job is the old one again: the run folder's resolved config and code snapshot, the same
    working folder, and `run(resume="auto")` from its newest checkpoint that verifies, exactly as a requeue
    would; its logs and metrics go to the same run folder, and job.json lists every job of the run. With
    `shape` (`slurm.key=value` overrides: nodes, GPUs per node, partition, time...) it runs as those say,
    on any number of processes that divides the run's virtual ranks, and the run folder's config says so
    from then on. The checkpoints are verified here first (each read once, streamed), so that the job is
    not queued for a run it cannot continue.

    Returns:
        The new job, and the checkpoint it will resume from (`.candidate.step`; `.note`: the one line about
        newer checkpoints that did not verify, if any).

    Raises:
        RunFolderError: not a run folder of `senet submit`, no usable checkpoint, a job still queued or
            running, or a shape whose process count does not divide the run's virtual ranks. ConfigError:
            its config no longer validates. SubmitError: sbatch refused the job.
    """
    run_dir = Path(run_dir).resolve()
    info = read_job_file(run_dir)
    state = job_state(str(info["job_id"]))
    if state in ACTIVE:
        raise RunFolderError(f"{run_dir}: its job {info['job_id']} is still {state}; it resumes by itself (or "
                             f"`senet cancel {info['job_id']}` first)")
    try:
        found = newest_usable(run_dir / CHECKPOINTS, verify_candidate)
    except CheckpointError as e:
        raise RunFolderError(str(e)) from None
    if found is None:
        raise RunFolderError(f"{run_dir}: no usable checkpoint to resume from (none in {run_dir / CHECKPOINTS}); "
                             f"submit the config as a new run")
    step = found.candidate.step
    cfg = load_config(run_dir / CONFIG, shape)
    check_job_config(cfg)
    check_shape(cfg, started_with(peek_checkpoint(found.candidate.path)), run_dir)
    _need_sbatch()
    job_id = _sbatch(cfg, run_dir, Path(info.get("workdir") or run_dir))
    if shape:
        (run_dir / CONFIG).write_text(dump_yaml(cfg))  # the run's shape from now on (its job writes it again)
    add_job(run_dir, job_id, resubmitted=now(), resumed_from_step=step, resubmit_command=command or [],
            nodes=cfg.slurm.nodes, tasks_per_node=tasks_per_node(cfg), gpus_per_node=cfg.slurm.gpus_per_node)
    return Submitted(job_id, run_dir), found


def check_shape(cfg: Config, virtual_ranks: int, run_dir: Path) -> None:
    """The job's processes (nodes x tasks per node) divide the run's virtual ranks, or one line naming what works.

    Raises:
        RunFolderError: naming the node counts that work at this many tasks per node (or that none does).
    """
    per_node = tasks_per_node(cfg)
    world = cfg.slurm.nodes * per_node
    if virtual_ranks % world == 0:
        return
    nodes = [n for n in range(1, virtual_ranks + 1) if virtual_ranks % (n * per_node) == 0]
    fix = (f"with {per_node} tasks per node use --nodes {say_sizes(nodes)}" if nodes else
           f"no node count works with {per_node} tasks per node; give --gpus-per-node a divisor of {virtual_ranks}")
    raise RunFolderError(f"{run_dir}: {cfg.slurm.nodes} node(s) x {per_node} tasks = {world} processes cannot host the "
                         f"run's {virtual_ranks} virtual ranks (fixed when it started; the process count must divide "
                         f"it); {fix}")


def _need_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run on a Slurm login node (or `make slurm-up` and "
                          "`source .slurm-local/env` for the local test cluster)")


def _sbatch(cfg: Config, run_dir: Path, workdir: Path) -> str:
    """Submit the run folder's TrainJob through submitit; its job id."""
    return sbatch_job(TrainJob(cfg, run_dir, workdir), cfg, run_dir)
