"""The demo's Slurm part: the local run again as a job, preempted mid-run, and proof that it resumed exactly.

The job runs at the local run's world size (the demo config: 2 nodes x 1 task, against `senet train
--nproc 2`, one CPU per rank either way). Once it has trained a third of its steps, a job in the
higher-priority `urgent` partition asks for exactly its nodes (`--nodelist`: the cluster has idle nodes
besides, which an urgent job would otherwise take): Slurm preempts ours with USR2, every rank writes a
checkpoint at the next agreed step boundary, submitit requeues the job, and the requeued job resumes
from that checkpoint. When it ends, the digests of its final parameters and the local run's must be
equal, and the job must have been requeued and resumed: the promise of exact resume, shown rather than
told.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slurm import queue
from slurm.client import slurm_command
from slurm.submit import submit
from training.checkpoint import load_checkpoint, parameters_digest
from training.config import Config
from training.metrics import read_metrics
from training.run_folder import CHECKPOINTS, LAST, METRICS

URGENT_JOB = "urgent-senet-demo"  # not "senet-...": `senet jobs` lists only training runs
POLL_S = 1.0


def preempted_run(cfg: Config, config_path: Path, reference: Path, out: Path, *, urgent_partition: str = "urgent",
                  at: float = 1 / 3, timeout_s: float = 900) -> dict[str, Any]:
    """Submit `cfg`, preempt it at `at` of its steps, wait for the end; compare with `reference` (a run folder).

    Writes OUT/slurm.json (job_id, run_dir) as soon as the job is queued and OUT/resume.json at the end.

    Returns:
        resume.json's content: job_id, run_dir, nodes, states (one per attempt), requeues, preempted_at (the
        step the job had logged when the urgent job came), resumed_at (the steps it resumed from), the final
        steps and parameter digests of both runs, identical, and requeued (preempted and resumed).

    Raises:
        slurm.client.SubmitError, SlurmError: Slurm refused or failed; TimeoutError: the job did not end.
    """
    total = max(r["step"] for r in read_metrics(reference / METRICS) if "step" in r)
    job = submit(cfg, config_path, Path(cfg.slurm.output_root), command=["senet", "demo-preemption"])
    (out / "slurm.json").write_text(json.dumps({"job_id": job.job_id, "run_dir": str(job.run_dir)}, indent=1) + "\n")
    deadline = time.monotonic() + timeout_s
    logged = 0
    while logged < at * total:
        _wait(deadline, f"job {job.job_id} to reach step {at * total:.0f}")
        if queue.job_state(job.job_id) not in queue.ACTIVE:
            break  # it ended early: the comparison below says so
        logged = _last_step(job.run_dir)
    victim_nodes = slurm_command("squeue", "-h", "-j", job.job_id, "-o", "%N").strip()
    urgent = slurm_command("sbatch", "--parsable", f"--partition={urgent_partition}", f"--nodes={cfg.slurm.nodes}",
                           f"--nodelist={victim_nodes}", "--exclusive", "--output=/dev/null",
                           f"--job-name={URGENT_JOB}", "--wrap", "sleep 1").strip()
    while queue.job_state(job.job_id) in queue.ACTIVE:
        _wait(deadline, f"job {job.job_id} to end")
    states = [s.split()[0] for s in slurm_command("sacct", "-n", "-X", "-P", "--duplicates", "-j", job.job_id,
                                                        "-o", "State").split()]
    resumed = [r["step"] for r in read_metrics(job.run_dir / METRICS) if r.get("event") == "resume"]
    ours, theirs = (load_checkpoint(run / CHECKPOINTS / LAST) for run in (job.run_dir, reference))
    result = {"job_id": job.job_id, "run_dir": str(job.run_dir), "urgent_job": urgent, "nodes": victim_nodes,
              "states": states, "requeues": max(0, len(states) - 1), "preempted_at": logged, "resumed_at": resumed,
              "steps": {"slurm": ours["step"], "local": theirs["step"]},
              "digests": {"slurm": parameters_digest(ours["model"]), "local": parameters_digest(theirs["model"])}}
    result["identical"] = result["digests"]["slurm"] == result["digests"]["local"] and states[-1:] == ["COMPLETED"]
    result["requeued"] = result["requeues"] >= 1 and bool(resumed)  # it was preempted and came back
    (out / "resume.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _last_step(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in read_metrics(run_dir / METRICS) if "loss" in r), default=0)


def _wait(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"gave up waiting for {what}")
    time.sleep(POLL_S)
