"""A training run as a Slurm job: the config's `slurm` section -> sbatch parameters -> submitit.

One run folder per job under the output root (`--out` / `slurm.output_root`), laid out like
`senet train --out` (training.run_folder) plus what only a job has:

    RUN/job.json            job ids, command, submit folder   RUN/logs/<job>_<rank>_log.{out,err}  (submitit's)
    RUN/code/               senet/ pipeline/ models/ training/ slurm/ as they were at submission

`resubmit` continues such a run folder with a new job once its job has ended.

The job imports from RUN/code (PYTHONPATH, and PYTHONSAFEPATH so the working folder never comes first),
so a requeued job runs the code it was submitted with, not whatever an editable install holds by then.
Its working folder is RUN (`--chdir`: `sacct` then remembers where the run lives, for `senet logs`);
the job itself goes back to the submission folder, so relative paths in the config mean what they mean
to `senet train`.

Tasks: one per GPU (`--ntasks-per-node = slurm.gpus_per_node`); `gpus_per_node: 0` asks for no GPUs and
one CPU task per node. The sbatch script comes from submitit's own generator, so `--dry-run` prints
exactly what would be submitted.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import Config, ConfigError
from training.run_folder import CHECKPOINTS, CONFIG, GIVEN_CONFIG, LAST

JOB_PREFIX = "senet-"  # job names: senet-<run folder name>; `senet jobs` lists these
LOGS, CODE, JOB_FILE = "logs", "code", "job.json"
PACKAGES = ("pipeline", "models", "training", "slurm", "senet")  # the code of a run, copied into RUN/code
DEFAULT_TASKS_CPU = 1  # tasks per node when gpus_per_node is 0


class SubmitError(Exception):
    """sbatch refused the job, or Slurm cannot be reached; one line saying why (exit 1)."""


class RunFolderError(Exception):
    """A run folder that cannot be continued as asked; one line saying why (exit 2)."""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_dir: Path

    def log_paths(self, rank: int = 0) -> tuple[Path, Path]:
        """stdout and stderr of one rank (submitit's names)."""
        return log_paths(self.run_dir, self.job_id, rank)


def log_paths(run_dir: Path, job_id: str, rank: int) -> tuple[Path, Path]:
    folder = run_dir / LOGS
    return folder / f"{job_id}_{rank}_log.out", folder / f"{job_id}_{rank}_log.err"


# ------------------------------------------------------------------------------------- parameters
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
        "additional_parameters": {"chdir": str(run_dir), **s.additional},
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "mem": f"{s.mem_gb}GB" if s.mem_gb else None, "exclusive": True if s.exclusive else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def sbatch_script(cfg: Config, run_dir: Path) -> str:
    """The sbatch script `submit` would hand to Slurm (submitit's generator, so it is the same text)."""
    from submitit.slurm.slurm import _make_sbatch_string  # no public way to render without submitting

    folder = (run_dir / LOGS).resolve()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(cfg, run_dir))


# ------------------------------------------------------------------------------------- run folder
def new_run_dir(root: Path, config_path: str | Path) -> Path:
    """ROOT/<config name>-<UTC time>, unique even for two submissions in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = f"{Path(config_path).stem}-{stamp}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = root / (base if n == 0 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SubmitError(f"{root}: no free run folder name for {base}")


def snapshot_code(dest: Path) -> Path:
    """Copy the packages the job imports (as this process sees them) into `dest`; returns `dest`."""
    import importlib.util

    dest.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SubmitError(f"package {name!r} not found; install senet (make install) before submitting")
        source = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cluster"))
    return dest


def prepare_run_dir(cfg: Config, config_path: str | Path, root: Path) -> Path:
    """A new run folder with the given and resolved config and the code snapshot."""
    from training.config import dump_yaml

    run_dir = new_run_dir(root, config_path).resolve()
    shutil.copyfile(config_path, run_dir / GIVEN_CONFIG)
    (run_dir / CONFIG).write_text(dump_yaml(cfg))
    snapshot_code(run_dir / CODE)
    (run_dir / LOGS).mkdir()
    return run_dir


# ----------------------------------------------------------------------------------------- submit
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
    info = {"job_id": job_id, "run_dir": str(run_dir), "submitted": _now(), "workdir": str(Path.cwd()),
            "command": command or [], "nodes": cfg.slurm.nodes, "tasks_per_node": tasks_per_node(cfg),
            "gpus_per_node": cfg.slurm.gpus_per_node, "jobs": [job_id]}
    (run_dir / JOB_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return Submitted(job_id, run_dir)


def resubmit(run_dir: Path, command: list[str] | None = None) -> tuple[Submitted, int]:
    """Continue a run whose job has ended (time limit after its last requeue, cancelled, node failure).

    The new job is the old one again: the run folder's resolved config and code snapshot, the same
    working folder, and `run(resume="auto")` from its last.pt, exactly as a requeue would; its logs and
    metrics go to the same run folder, and job.json lists every job of the run.

    Returns:
        The new job and the step it will resume from.

    Raises:
        RunFolderError: not a run folder of `senet submit`, no usable checkpoint, or a job still queued or
            running. ConfigError: its config no longer validates. SubmitError: sbatch refused the job.
    """
    from slurm.queue import ACTIVE, job_state
    from training.checkpoint import CheckpointError, peek_checkpoint
    from training.config import load_config

    run_dir = Path(run_dir).resolve()
    try:
        info = json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        raise RunFolderError(f"{run_dir}: no readable {JOB_FILE}; --resume takes a run folder that `senet submit` "
                             f"made") from None
    state = job_state(str(info["job_id"]))
    if state in ACTIVE:
        raise RunFolderError(f"{run_dir}: its job {info['job_id']} is still {state}; it resumes by itself (or "
                             f"`senet cancel {info['job_id']}` first)")
    last = run_dir / CHECKPOINTS / LAST
    try:
        step = int(peek_checkpoint(last)["step"])
    except CheckpointError as e:
        raise RunFolderError(f"{run_dir}: no usable checkpoint to resume from ({e}); submit the config as a new run") \
            from None
    cfg = load_config(run_dir / CONFIG)
    check_job_config(cfg)
    _need_sbatch()
    job_id = _sbatch(cfg, run_dir, Path(info.get("workdir") or run_dir))
    info.update({"job_id": job_id, "jobs": [*info.get("jobs", [info["job_id"]]), job_id], "resubmitted": _now(),
                 "resumed_from_step": step, "resubmit_command": command or []})
    (run_dir / JOB_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return Submitted(job_id, run_dir), step


def _need_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run on a Slurm login node (or `make slurm-up` and "
                          "`source .slurm-local/env` for the local test cluster)")


def _sbatch(cfg: Config, run_dir: Path, workdir: Path) -> str:
    """Submit the run folder's TrainJob through submitit; its job id."""
    import submitit

    from slurm.job import TrainJob

    try:
        executor = submitit.SlurmExecutor(folder=run_dir / LOGS, max_num_timeout=cfg.slurm.max_requeues)
        executor.update_parameters(**sbatch_parameters(cfg, run_dir))
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
            return executor.submit(TrainJob(cfg, run_dir, workdir)).job_id
    except Exception as e:  # noqa: BLE001 - submitit raises plain exceptions for sbatch's refusals
        raise SubmitError(explain_sbatch_error(str(e))) from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def explain_sbatch_error(text: str) -> str:
    """sbatch's complaint as one line, with the partitions when the partition was the problem."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["no message"]
    message = errors[-1]
    message = re.sub(r"^(sbatch: )?error: (Batch job submission failed: )?", "", message)
    if no_configuration(text):
        return f"sbatch cannot find the cluster: {message} ({NO_CONFIGURATION_HINT})"
    for words, (what, fields, per_node, advice) in SBATCH_HINTS.items():
        if any(word in message.lower() for word in words):
            known = sinfo(fields, per_node)
            if known:
                message += f" ({what}: {known}; {advice})"
            break
    return f"sbatch refused the job: {message}"


NO_CONFIGURATION_HINT = "set SLURM_CONF to the cluster's slurm.conf; for the local test cluster: source .slurm-local/env"


def no_configuration(stderr: str) -> bool:
    """A Slurm client's complaint that it found no slurm.conf (no SLURM_CONF, no configless DNS record)."""
    return any(words in stderr for words in ("configuration source", "fetch config", "resolve_ctls_from_dns_srv"))


# sbatch complaint (any of these words) -> what sinfo can add: (label, fields, per node, advice)
SBATCH_HINTS = {
    ("partition",): ("partitions here", "%P", False, "pick one with --partition"),
    ("node configuration", "gres"): ("nodes here (name CPUs GPUs)", "%N %c %G", True,
                                     "ask for fewer --nodes, --gpus-per-node or slurm.cpus_per_task"),
    ("time limit",): ("partition time limits", "%P %l", False, "lower --time"),
}


def sinfo(fields: str, per_node: bool = False) -> str:
    """What `sinfo -o FIELDS` reports, one distinct line each, joined by ', ' ('' when it cannot say)."""
    try:
        out = subprocess.run(["sinfo", "-h", *(["-N"] if per_node else []), "-o", fields], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return ", ".join(sorted(set(line.strip() for line in out.splitlines() if line.strip())))


def apply_cli(cfg_overrides: list[str], nodes: int | None, gpus_per_node: int | None, partition: str | None,
              time_limit: str | None, account: str | None, qos: str | None, out: str | None) -> list[str]:
    """The command-line options as `slurm.key=value` overrides, so they are validated and saved like `--set`."""
    items = list(cfg_overrides)
    given = {"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition, "account": account, "qos": qos,
             "output_root": out, "time_min": parse_time(time_limit) if time_limit is not None else None}
    for key, value in given.items():
        if value is not None:
            items.append(f"slurm.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return items

