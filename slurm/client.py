"""Slurm's client commands (squeue, sacct, scontrol, sinfo, sbatch): running them, and saying their complaints
in one line, with what `sinfo` can add when the request did not fit the cluster.

Client commands read SLURM_CONF from the environment like any Slurm command.
"""
from __future__ import annotations

import re
import subprocess


class SlurmError(Exception):
    """A Slurm command failed or a job is unknown; one line saying why (exit 1)."""


class SubmitError(Exception):
    """sbatch refused the job, or Slurm cannot be reached; one line saying why (exit 1)."""


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


def slurm_command(*args: str, timeout: float = 30) -> str:
    """stdout of a Slurm client command; its first error line as a SlurmError when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: run on a Slurm login node (or `make slurm-up` and "
                         f"`source .slurm-local/env` for the local test cluster)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f} s; is slurmctld up?") from None
    if done.returncode:
        if no_configuration(done.stderr):
            raise SlurmError(f"{args[0]} cannot find the cluster ({NO_CONFIGURATION_HINT})")
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()] or [f"exit status {done.returncode}"]
        message = re.sub(r"^[\w-]+: error: ", "", lines[0])
        raise SlurmError(f"{args[0]}: {message}")
    return done.stdout


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
