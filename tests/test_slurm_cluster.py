"""The local Slurm cluster of slurm/cluster/ (how it is set up: up.sh): nodes, accounting, submitit, preemption.

`make slurm-up` starts it (or finds it up) and it stays up for later test modules; `make slurm-down`
stops and wipes it. Needs root, like the Makefile targets.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import job_state, sacct_states, slurm, start_cluster, wait_until

# A GPU node's bare interpreter has no submitit: this module is skipped there, so `pytest -m gpu` collects.
submitit = pytest.importorskip("submitit", reason="the Slurm tests need submitit (pip install submitit)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Start the cluster (idempotent), export its environment for this module, and leave it up."""
    cluster_env = start_cluster()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in cluster_env.items():
            mp.setenv(name, value)  # submitit calls sbatch/sacct with os.environ
        yield cluster_env


def test_four_idle_nodes_with_eight_gpus_and_three_partitions(cluster: dict[str, str]) -> None:
    def nodes() -> set[str]:
        return set(slurm("sinfo", "-N", "-h", "-o", "%N %t %G %c").splitlines())  # a line per partition

    expected = {f"node{i} idle gpu:8 16" for i in range(1, 5)}
    deadline = time.monotonic() + 20  # jobs of an earlier test module may still be ending
    while nodes() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert nodes() == expected
    modes = dict(line.split() for line in slurm("sinfo", "-h", "-o", "%P %p").splitlines())  # name, priority tier
    assert modes.keys() == {"debug*", "cancel", "urgent"} and int(modes["urgent"]) > int(modes["cancel"]) == int(modes["debug*"])
    shown = slurm("scontrol", "show", "partition", "cancel")
    assert "PreemptMode=CANCEL" in shown and "GraceTime=10" in shown


def test_sbatch_two_nodes_two_tasks_each(cluster: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job_id = slurm("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gres=gpu:2",
                   f"--output={out}", "--wrap",
                   "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID $CUDA_VISIBLE_DEVICES'").strip()
    wait_until(lambda: job_state(job_id) == "", 30, f"job {job_id} leaving the queue")
    wait_until(lambda: sacct_states(job_id) == ["COMPLETED"], 10, f"sacct reporting job {job_id} COMPLETED")
    tasks = sorted(out.read_text().splitlines(), key=lambda line: int(line.split()[1]))
    assert tasks == ["node1 0 0,1", "node1 1 0,1", "node2 2 0,1", "node2 3 0,1"]  # the first idle nodes


def test_submitit_two_nodes_two_tasks_each(cluster: dict[str, str], tmp_path: Path) -> None:
    # Defined here so cloudpickle sends it by value: the job cannot import this test module.
    def where_am_i() -> tuple[str, str, str]:
        import socket

        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # MASTER_ADDR is the first node's name: it must resolve, or gloo/NCCL hang for 60 s.
        return os.environ["SLURMD_NODENAME"], os.environ["RANK"], socket.gethostbyname(env.master_addr)

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=2, timeout_min=5)
    job = executor.submit(where_am_i)
    wait_until(job.done, 30, f"submitit job {job.job_id} finishing")
    assert job.results() == [("node1", "0", "127.0.0.1"), ("node1", "1", "127.0.0.1"),
                             ("node2", "2", "127.0.0.1"), ("node2", "3", "127.0.0.1")]


# Each run logs its restart count; USR2 (its --signal, sent at preemption) and the SIGTERM that
# follows GraceTime later are logged too. The traps come first: USR2 would otherwise kill bash.
# The second run finishes at once.
PREEMPTIBLE_JOB = """#!/bin/bash
trap 'echo USR2 >> "$LOG"' USR2
trap 'echo TERM >> "$LOG"; exit 143' TERM
echo "start ${SLURM_RESTART_COUNT:-0}" >> "$LOG"
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && exit 0
for _ in $(seq 600); do sleep 0.1; done
"""


def preempt(low: str, log: Path) -> str:
    """Wait for job `low` to start, then submit an urgent job on exactly its nodes (idle ones would not preempt)."""
    wait_until(lambda: log.exists(), 20, f"job {low} starting")
    nodes = slurm("squeue", "-h", "-j", low, "-o", "%N").strip()
    return slurm("sbatch", "--parsable", "--partition=urgent", "--nodes=2", f"--nodelist={nodes}", "--exclusive",
                 "--output=/dev/null", "--wrap", "true").strip()


def test_urgent_job_preempts_and_requeues_debug_job(cluster: dict[str, str], tmp_path: Path) -> None:
    log, script = tmp_path / "runs.log", tmp_path / "preemptible.sh"
    script.write_text(PREEMPTIBLE_JOB)
    low = slurm("sbatch", "--parsable", "--partition=debug", "--nodes=2", "--exclusive", "--signal=B:USR2@60",
                f"--export=ALL,LOG={log}", "--output=/dev/null", str(script)).strip()
    high = preempt(low, log)
    wait_until(lambda: job_state(high) == "" and job_state(low) == "", 45, f"jobs {low} and {high} finishing")

    assert log.read_text().split() == ["start", "0", "USR2", "TERM", "start", "1"]
    assert "Restarts=1" in slurm("scontrol", "show", "job", low)
    wait_until(lambda: sacct_states(low) == ["PREEMPTED", "COMPLETED"], 10, f"sacct showing job {low} requeued")


def test_urgent_job_preempts_and_cancels_a_job_of_the_cancel_partition(cluster: dict[str, str], tmp_path: Path) -> None:
    """Even with --requeue the job ends: what a run there must survive by submitting its own next job."""
    log, script = tmp_path / "runs.log", tmp_path / "preemptible.sh"
    script.write_text(PREEMPTIBLE_JOB)
    low = slurm("sbatch", "--parsable", "--partition=cancel", "--nodes=2", "--exclusive", "--requeue",
                "--signal=B:USR2@60", f"--export=ALL,LOG={log}", "--output=/dev/null", str(script)).strip()
    high = preempt(low, log)
    wait_until(lambda: job_state(high) == "" and job_state(low) == "", 45, f"jobs {low} and {high} finishing")

    assert log.read_text().split() == ["start", "0", "USR2", "TERM"]  # warned, then ended; never started again
    wait_until(lambda: sacct_states(low) == ["PREEMPTED"], 10, f"sacct showing job {low} preempted")
