"""What a Slurm run does after a failure (`slurm.recovery.decide`) and what `senet submit` says about
preemption (`slurm.preemption.plan`), from verdicts, records and Slurm's own words.

The jobs themselves (a stopped rank, a dead node, a NaN loss, a CANCEL preemption on the real local
cluster) are in tests/test_slurm_jobs.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# slurm/ needs submitit (a GPU node's bare interpreter may lack it): skipped there, so `pytest -m gpu` collects.
pytest.importorskip("submitit", reason="the slurm package needs submitit (pip install submitit)")

from slurm.preemption import Cluster, Partition, RunTimes, mode_of, parse_config, parse_partitions, plan
from slurm.recovery import decide, run_notes, smaller_shape
from training.config import load_config
from training.health import RankInfo, Verdict, diagnose, own_verdict
from training.engine import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]
NODE2 = RankInfo(3, "node2", "host", 42)
SILENT = diagnose(RankInfo(0, "node1", "host", 41), 14, {}, {3: 31.0}, {0: RankInfo(0, "node1", "host", 41), 3: NODE2})
CRASH = Verdict("error", "rank 3 failed: RuntimeError: CUDA error: an illegal memory access", (3,), ("node2",), (14,),
                error="RuntimeError: CUDA error: an illegal memory access", error_types=("RuntimeError", "Exception"),
                step=14, reporter=3)


def record(verdict: Verdict, action: str = "continued", exclude: tuple[str, ...] = ("node2",)) -> dict:
    return {"job": "7", "kind": verdict.kind, "step": verdict.step, "error": verdict.error, "action": action,
            "exclude": list(exclude), "new_job": "8", "summary": "rank 3 (node2) stopped answering after step 14"}


def test_a_hung_rank_continues_the_run_without_its_node_and_every_node_suspected_before() -> None:
    decision = decide(SILENT, [record(CRASH, exclude=("node4",))], max_failure_requeues=3)
    assert decision.action == "continue" and decision.exclude == ("node2", "node4")


def test_deterministic_failures_are_not_retried() -> None:
    nan = own_verdict(NODE2, 9, NonFiniteLoss("loss is not finite at step 9"))
    assert decide(nan, [], 3).action == "stop" and "NonFiniteLoss" in decide(nan, [], 3).reason
    assert decide(CRASH, [], 3).action == "continue"  # the first time: it may be the node
    again = decide(CRASH, [record(CRASH)], 3)
    assert again.action == "stop" and "the same exception at the same step (14)" in again.reason


def test_continuations_are_bounded_by_max_failure_requeues_and_preemptions_do_not_count() -> None:
    preempted = {"job": "5", "kind": "preempted", "mode": "CANCEL", "action": "continued", "new_job": "6"}
    assert decide(SILENT, [preempted, record(SILENT), record(SILENT)], 3).action == "continue"
    stop = decide(SILENT, [record(SILENT)] * 3, 3)
    assert stop.action == "stop" and stop.reason == "slurm.max_failure_requeues = 3 continuations used"


def test_senet_jobs_notes_come_from_the_records_and_the_current_jobs_slow_rank(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "8", "jobs": ["7", "8"]}))
    (tmp_path / "failures.jsonl").write_text(json.dumps(record(SILENT)) + "\n")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "straggler", "step": 4, "rank": 0, "node": "node1", "wait_s": 0.2},  # the earlier job's
        {"event": "resume", "step": 12},
        {"event": "straggler", "step": 20, "rank": 3, "node": "node3", "wait_s": 0.31}]) + "\n")
    notes = run_notes(tmp_path)
    assert notes["7"] == "rank 3 (node2) stopped answering after step 14 -> continued as job 8 without node2"
    assert notes["8"] == "slow: rank 3 (node3) kept the others waiting 0.31 s per step at step 20"


CONFIG = """\
SlurmctldParameters     = preempt_send_user_signal
PreemptMode             = REQUEUE
PreemptType             = preempt/partition_prio
KillWait                = 30 sec
JobRequeue              = 1
"""
PARTITIONS = """\
PartitionName=debug
   AllocNodes=ALL Default=YES QoS=N/A
   DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=120 Hidden=NO
   OverTimeLimit=NONE PreemptMode=REQUEUE

PartitionName=spot
   AllocNodes=ALL Default=NO QoS=N/A
   DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO
   OverTimeLimit=NONE PreemptMode=CANCEL
"""


def test_scontrol_output_is_read_into_the_preemption_settings() -> None:
    cluster = parse_config(CONFIG)
    assert cluster == Cluster("preempt/partition_prio", "REQUEUE", 30, user_signal=True, job_requeue=True)
    partitions = parse_partitions(PARTITIONS)
    assert partitions == {"debug": (Partition("debug", "REQUEUE", 120), True), "spot": (Partition("spot", "CANCEL", 0), False)}
    assert mode_of("GANG,REQUEUE") == "REQUEUE" and mode_of("SUSPEND,GANG") == "SUSPEND" and mode_of("off") == "OFF"


@pytest.fixture
def cfg():
    return load_config(ROOT / "configs" / "se_resnext50_32x4d.yaml")  # signal_delay_s 120, 24 h, checkpoint_every 1000


def test_the_plan_says_in_one_line_how_each_mode_survives_a_preemption(cfg) -> None:
    cluster = parse_config(CONFIG)
    requeue = plan(Partition("debug", "REQUEUE", 120), cluster, cfg)
    assert requeue.line.startswith("preemption on partition debug: Slurm requeues the job (PreemptMode=REQUEUE); "
                                   "it checkpoints at the USR2 (GraceTime 120 s + KillWait 30 s)") and not requeue.fatal
    cancel = plan(Partition("spot", "CANCEL", 0), Cluster("preempt/partition_prio", "REQUEUE", 30), cfg)
    assert "Slurm cancels the job (PreemptMode=CANCEL); it checkpoints at the SIGTERM" in cancel.line
    assert "submits the run's next job itself" in cancel.line and not cancel.fatal
    qos = plan(Partition("debug", "REQUEUE", 120), Cluster("preempt/qos", "CANCEL", 30), cfg)
    assert "decided by QOS (PreemptType=preempt/qos), which cannot be told" in qos.line and not qos.fatal
    none = plan(Partition("debug", "OFF", 0), Cluster(), cfg)
    assert none.line == "preemption on partition debug: none (PreemptType=preempt/none, PreemptMode=OFF)"


def test_nothing_that_can_work_is_refused_and_what_periodic_checkpoints_carry_is_a_warning(cfg) -> None:
    no_time = plan(Partition("spot", "CANCEL", 0), Cluster("preempt/partition_prio", "CANCEL", 0), cfg)
    assert no_time.fatal and "no signal time at all" in no_time.fatal
    slow_writes = RunTimes(write_s=150.0, step_s=0.4)  # this run's checkpoints took up to 150 s to write
    late = plan(Partition("debug", "REQUEUE", 120), parse_config(CONFIG), cfg, slow_writes)
    assert late.fatal and late.fatal.startswith("slurm.signal_delay_s = 120 s cannot cover a checkpoint")
    short_grace = plan(Partition("debug", "REQUEUE", 10), parse_config(CONFIG), cfg, RunTimes(write_s=50.0, step_s=0.4))
    assert not short_grace.fatal and "resumes from the last periodic one" in short_grace.warnings[0]
    cancel = plan(Partition("spot", "CANCEL", 10), parse_config(CONFIG), cfg, RunTimes(write_s=50.0, step_s=0.4))
    assert cancel.fatal and "could not checkpoint and continue" in cancel.fatal
    slow_steps = plan(Partition("debug", "REQUEUE", 120), parse_config(CONFIG), cfg, RunTimes(write_s=5, step_s=100))
    assert any("longer than the time limit" in w for w in slow_steps.warnings)


@pytest.mark.parametrize("nodes, per_node, virtual, healthy, continued_on", [
    (4, 8, 32, 5, 4),  # enough healthy nodes: the run's own shape
    (4, 8, 32, None, 4),  # sinfo cannot tell: the run's own shape
    (4, 8, 32, 3, 2),  # 3 x 8 = 24 does not divide 32: 2 nodes, each process hosting 2 virtual ranks
    (4, 8, 32, 1, 1),
    (3, 8, 24, 2, 1),  # 16 does not divide 24, 8 does
    (2, 3, 8, 1, 2),  # no smaller shape divides 8 virtual ranks: the run's own, pending until nodes come back
])
def test_a_failure_that_leaves_fewer_healthy_nodes_continues_on_the_largest_shape_that_divides_the_virtual_ranks(
        nodes: int, per_node: int, virtual: int, healthy: int | None, continued_on: int) -> None:
    assert smaller_shape(nodes, per_node, virtual, healthy) == continued_on
