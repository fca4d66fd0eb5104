"""What Slurm knows about senet jobs: their states, run folders and logs (squeue, sacct, scontrol).

The run folder of a job is its working folder (`senet submit` passes `--chdir=RUN`), which both the
controller (`scontrol show job`, while it remembers the job) and accounting (`sacct`, afterwards) keep.
Client commands read SLURM_CONF from the environment like any Slurm command.
"""
from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from pathlib import Path

from slurm.client import SlurmError, slurm_command
from slurm.job_folder import JOB_PREFIX

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "STOPPED", "PREEMPTED", "SIGNALING", "STAGE_OUT"}  # states a job can leave by itself
HISTORY = "now-7days"  # how far back `senet jobs` looks in accounting


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str
    state: str
    elapsed: str
    nodes: str
    run_dir: str


def list_jobs() -> list[JobInfo]:
    """This user's senet jobs of the last week, oldest first (accounting; the queue where there is none)."""
    user = getpass.getuser()
    try:
        out = slurm_command("sacct", "-X", "-n", "-P", "-u", user, "-S", HISTORY,
                            "-o", "JobID,JobName%200,State,Elapsed,NNodes,WorkDir")
        rows = [line.split("|") for line in out.splitlines() if line]
    except SlurmError:
        out = slurm_command("squeue", "-h", "-u", user, "-o", "%i|%j|%T|%M|%D|%Z")
        rows = [line.split("|") for line in out.splitlines() if line]
    jobs = [JobInfo(r[0], r[1], r[2].split()[0], r[3], r[4], r[5]) for r in rows if len(r) >= 6]
    return sorted((j for j in jobs if j.name.startswith(JOB_PREFIX)), key=lambda j: [int(x) for x in j.job_id.split("_")])


def job_state(job_id: str) -> str:
    """The job's state: the queue's while it is there, then accounting's ('' when neither knows it)."""
    try:
        out = slurm_command("squeue", "-h", "-j", job_id, "-o", "%T").split()
    except SlurmError:  # "Invalid job id specified" once the controller has forgotten the job
        out = []
    if out:
        return out[0]
    try:
        out = slurm_command("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State")
    except SlurmError:
        return ""
    states = [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" -> CANCELLED
    return states[-1] if states else ""


def run_dir_of(job_id: str) -> Path:
    """The run folder of a senet job.

    Raises:
        SlurmError: unknown job, or not a senet job.
    """
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise SlurmError(f"job id {job_id!r} is not a Slurm job id (a number, as `senet jobs` lists them)")
    name = workdir = ""
    try:
        shown = slurm_command("scontrol", "show", "job", job_id)
        name = _field(shown, "JobName")
        workdir = _field(shown, "WorkDir")
    except SlurmError:
        pass
    if not workdir:
        try:
            rows = slurm_command("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobName%200,WorkDir").splitlines()
        except SlurmError as e:
            raise SlurmError(f"job {job_id} is not in the queue and accounting cannot say more ({e})") from None
        if not rows:
            raise SlurmError(f"job {job_id}: Slurm knows no such job (see `senet jobs`)")
        name, workdir = rows[-1].split("|")[:2]
    if not name.startswith(JOB_PREFIX):
        raise SlurmError(f"job {job_id} ({name!r}) was not submitted by `senet submit`: it has no run folder")
    return Path(workdir)


def _field(text: str, key: str) -> str:
    m = re.search(rf"(?:^|\s){key}=(\S*)", text)
    return m.group(1) if m else ""


def cancel(job_id: str) -> None:
    """scancel the job (and any requeue of it)."""
    slurm_command("scancel", job_id)
