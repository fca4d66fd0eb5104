"""The run folder of a Slurm job: laid out like `senet train --out` (training.run_folder) plus what only a
job has, made once per run and continued by every job of it:

    RUN/job.json            job ids, command, submit folder   RUN/logs/<job>_<rank>_log.{out,err}  (submitit's)
    RUN/code/               senet/ pipeline/ models/ training/ slurm/ as they were at submission
    RUN/failures.jsonl      append-only: each failure or CANCEL preemption, and what the run did (slurm.recovery)

The job imports from RUN/code (PYTHONPATH, and PYTHONSAFEPATH so the working folder never comes first),
so a requeued job runs the code it was submitted with, not whatever an editable install holds by then.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

from slurm.client import SubmitError
from training.config import Config, dump_yaml
from training.run_folder import CONFIG, GIVEN_CONFIG

JOB_PREFIX = "senet-"  # job names: senet-<run folder name>; `senet jobs` lists these
LOGS, CODE, JOB_FILE = "logs", "code", "job.json"
PACKAGES = ("pipeline", "models", "training", "slurm", "senet")  # the code of a run, copied into RUN/code


class RunFolderError(Exception):
    """A run folder that cannot be continued as asked; one line saying why (exit 2)."""


def log_paths(run_dir: Path, job_id: str, rank: int) -> tuple[Path, Path]:
    """stdout and stderr of one rank of a job (submitit's names)."""
    folder = run_dir / LOGS
    return folder / f"{job_id}_{rank}_log.out", folder / f"{job_id}_{rank}_log.err"


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
    run_dir = new_run_dir(root, config_path).resolve()
    shutil.copyfile(config_path, run_dir / GIVEN_CONFIG)
    (run_dir / CONFIG).write_text(dump_yaml(cfg))
    snapshot_code(run_dir / CODE)
    (run_dir / LOGS).mkdir()
    return run_dir


def read_job_file(run_dir: Path) -> dict[str, Any]:
    """RUN/job.json.

    Raises:
        RunFolderError: not a run folder that `senet submit` made.
    """
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        raise RunFolderError(f"{run_dir}: no readable {JOB_FILE}; --resume takes a run folder that `senet submit` "
                             f"made") from None


def write_job_file(run_dir: Path, info: dict[str, Any]) -> None:
    tmp = run_dir / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(run_dir / JOB_FILE)  # a reader (`senet jobs`, the next job) never sees half a file


def add_job(run_dir: Path, job_id: str, **facts: Any) -> dict[str, Any]:
    """Record `job_id` as the run's current job in job.json (after the others in `jobs`), with `facts`."""
    info = read_job_file(run_dir)
    info.update({"job_id": job_id, "jobs": [*info.get("jobs", [info["job_id"]]), job_id], **facts})
    write_job_file(run_dir, info)
    return info


def now() -> str:
    """UTC time as job.json records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
