"""The config's `slurm` section as sbatch parameters: what submitit is asked for, the script `--dry-run` prints,
and the submission itself (`sbatch_job`: a job of a run folder, also the run's next job after a failure).

Tasks: one per GPU (`--ntasks-per-node = slurm.gpus_per_node`); `gpus_per_node: 0` asks for no GPUs and
one CPU task per node. The job's working folder is RUN (`--chdir`: `sacct` then remembers where the run
lives, for `senet logs`). The sbatch script comes from submitit's own generator, so `--dry-run` prints
exactly what would be submitted. Every job asks for `--requeue`: a cluster with `JobRequeue=0` would
otherwise refuse the requeue that a preemption or a time limit needs (submitit does not pass it).
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from slurm.client import SubmitError, explain_sbatch_error
from slurm.job_folder import CODE, JOB_PREFIX, LOGS
from training.config import Config, ConfigError

DEFAULT_TASKS_CPU = 1  # tasks per node when gpus_per_node is 0


def parse_time(text: str) -> int:
    """A Slurm time limit (`90`, `1:30:00`, `2-00:00:00`, `1-12`, `45:30`) in whole minutes, rounded up.

    Raises:
        ConfigError: not one of Slurm's formats.
    """
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: use minutes (90) or Slurm's [days-]hours:minutes:seconds (1:30:00, 2-00:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # hours:minutes:seconds
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # minutes:seconds
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds < 60:
        raise ConfigError(f"--time {text!r}: the time limit must be at least one minute")
    return -(-seconds // 60)


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; one CPU task per node when the job asks for no GPUs."""
    return cfg.slurm.gpus_per_node or DEFAULT_TASKS_CPU


def check_job_config(cfg: Config) -> None:
    """Relations between `slurm` keys and the rest that only a job has.

    Raises:
        ConfigError: naming the keys and the fix.
    """
    s = cfg.slurm
    if cfg.train.device == "gpu" and s.gpus_per_node == 0:
        raise ConfigError("train.device = 'gpu' but slurm.gpus_per_node = 0; ask for GPUs (--gpus-per-node 8) "
                          "or set train.device=cpu")
    if s.signal_delay_s >= s.time_min * 60:
        raise ConfigError(f"slurm.signal_delay_s = {s.signal_delay_s} is not shorter than the time limit "
                          f"({s.time_min} min): the checkpoint signal would come before the job starts; "
                          f"lower slurm.signal_delay_s or raise slurm.time_min")


def sbatch_parameters(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) for `cfg` in `run_dir`.

    submitit adds `--signal=USR2@signal_delay_s`, `--open-mode=append` (a requeued job appends to its
    logs) and the per-rank `--output/--error` of srun; we add srun's `--cpus-per-task`.
    """
    s = cfg.slurm
    run_dir = run_dir.resolve()
    params: dict[str, Any] = {
        "job_name": JOB_PREFIX + run_dir.name,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        "wckey": None,  # not submitit's default 'submitit': clusters that enforce wckeys would refuse it
        # srun of Slurm 22.05-23.02 does not read SLURM_CPUS_PER_TASK from sbatch: without the option each task
        # gets one CPU (and its affinity mask says so) however many the job asked for.
        "srun_args": ["--cpus-per-task", str(s.cpus_per_task)],
        "setup": [
            f"export PYTHONPATH={shlex.quote(str(run_dir / CODE))}",  # the snapshot, before any installed copy
            "export PYTHONSAFEPATH=1",  # the working folder never shadows the snapshot
        ],
        "additional_parameters": {"chdir": str(run_dir), "requeue": True, **s.additional},
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "mem": f"{s.mem_gb}GB" if s.mem_gb else None, "exclusive": True if s.exclusive else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def sbatch_job(job: Callable[[], Any], cfg: Config, run_dir: Path, exclude: Sequence[str] = (),
               after: str | None = None) -> str:
    """Submit `job` (a `slurm.job.TrainJob`) for `run_dir` through submitit; its job id.

    Args:
        exclude: nodes the job must not run on (`--exclude`).
        after: a job id this one starts after, however that one ends (`--dependency=afterany:ID`).

    Raises:
        SubmitError: sbatch refused the job (one line).
    """
    params = sbatch_parameters(cfg, run_dir)
    if exclude:
        params["exclude"] = ",".join(sorted(set(exclude)))
    if after:
        params["additional_parameters"]["dependency"] = f"afterany:{after}"
    try:
        executor = submitit.SlurmExecutor(folder=run_dir / LOGS, max_num_timeout=cfg.slurm.max_requeues)
        executor.update_parameters(**params)
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
            return executor.submit(job).job_id
    except Exception as e:  # noqa: BLE001 - submitit raises plain exceptions for sbatch's refusals
        raise SubmitError(explain_sbatch_error(str(e))) from None


def sbatch_script(cfg: Config, run_dir: Path) -> str:
    """The sbatch script `submit` would hand to Slurm (submitit's generator, so it is the same text)."""
    from submitit.slurm.slurm import _make_sbatch_string  # no public way to render without submitting

    folder = (run_dir / LOGS).resolve()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(cfg, run_dir))
