"""A Slurm run that carries on by itself: after a rank failure, or a preemption that cancels the job, the job
submits the run's next job, and every such decision is one line of RUN/failures.jsonl (append-only).

A rank failure (`training.health` names it: a hung or dead rank, a rank that raised, a collective that
timed out) is handled by the one rank that claimed the verdict:

- deterministic failures stop the run: a config error, a NaN loss, an unreadable checkpoint or data
  (`DETERMINISTIC`), or the same exception at the same step as the run's previous failure. Nothing is
  retried; the log has one line, and `senet jobs` shows it.
- the others continue the run in a NEW job (`sbatch --exclude=<the suspect nodes>`, every node suspected
  in this run so far), which resumes from the newest good checkpoint (`resume="auto"`), and then cancel
  this job: a requeue of it would wait for an unanswering node to be declared DOWN (SlurmdTimeout) and for
  its credential to expire, a new job waits for neither. At most `slurm.max_failure_requeues` times.
  Fewer healthy nodes left in the partition than the run has (`sinfo`: not down, drained, failing or
  unanswering, and not suspected): the new job asks for the most of them whose processes still divide
  the run's virtual ranks (`training.virtual`: the same run on fewer processes, each hosting more virtual
  ranks; RUN/shapes.jsonl records it), and pends only when no smaller shape works.

A preemption by PreemptMode=CANCEL (or a mode that cannot be told, under QOS preemption) ends the job for
good, so after the checkpoint at the warning the job submits the run's next job, to start once this one
has ended (`--dependency=afterany`: two jobs never train the same run folder, even if Slurm requeued this
one after all). Preemptions are not failures: they are recorded, not counted.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from pipeline.errors import DataError
from slurm.client import SlurmError, SubmitError, slurm_command
from slurm.job_folder import RunFolderError, add_job, now, read_job_file
from slurm.sbatch import sbatch_job, tasks_per_node
from training.checkpoint import CheckpointError, peek_checkpoint
from training.config import Config, ConfigError
from training.engine import NonFiniteLoss
from training.health import Verdict
from training.metrics import read_metrics
from training.run_folder import CHECKPOINTS, LAST, METRICS
from training.virtual import started_with

log = logging.getLogger("senet.slurm")

FAILURES = "failures.jsonl"
# Exceptions that come back in a new job just the same (their class or a base class, by name).
DETERMINISTIC = tuple(c.__name__ for c in (ConfigError, NonFiniteLoss, CheckpointError, DataError))
# What a job's environment must not hand to the next job's sbatch (the old job's and ranks' own facts);
# SLURM_CONF stays: it says which cluster.
JOB_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SUBMITIT_", "SENET_RUN_ID")
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
KEEP_ENV = ("SLURM_CONF",)
# sinfo's short node states in which a node can take a job (a suffix such as '*', not answering, excludes it)
USABLE_STATES = ("idle", "mix", "alloc", "comp")


class RunJob(Protocol):
    """What recovery needs of a `slurm.job.TrainJob` (a new one of its type is the next job)."""

    cfg: Config
    run_dir: Path
    workdir: Path


@dataclass(frozen=True)
class Decision:
    action: str  # "continue" or "stop"
    reason: str
    exclude: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------- records
def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """RUN/failures.jsonl, oldest first (a torn last line is skipped)."""
    path = Path(run_dir) / FAILURES
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """One line, appended and flushed to disk (the next job reads it to count and compare)."""
    with open(Path(run_dir) / FAILURES, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_deterministic(cls: type) -> bool:
    """An exception of this class would come back in a new job just the same."""
    return any(c.__name__ in DETERMINISTIC for c in cls.__mro__)


def decide(verdict: Verdict, records: list[dict[str, Any]], max_failure_requeues: int) -> Decision:
    """Continue the run elsewhere, or stop it (pure: the verdict and the run's earlier records decide)."""
    if set(verdict.error_types) & set(DETERMINISTIC):
        return Decision("stop", f"deterministic ({verdict.error_types[0]}): not retried")
    failures = [r for r in records if r.get("kind") != "preempted"]
    if verdict.kind == "error" and failures and failures[-1].get("error") == verdict.error \
            and failures[-1].get("step") == verdict.step:
        return Decision("stop", f"the same exception at the same step ({verdict.step}) as in job "
                                f"{failures[-1].get('job')}: deterministic, not retried")
    used = sum(1 for r in failures if r.get("action") == "continued")
    if used >= max_failure_requeues:
        return Decision("stop", f"slurm.max_failure_requeues = {max_failure_requeues} continuations used")
    suspects = {n for r in failures for n in r.get("exclude", [])}
    if verdict.kind in ("silent", "stuck", "error"):
        suspects |= set(verdict.nodes)
    return Decision("continue", "", tuple(sorted(suspects)))


def run_notes(run_dir: Path) -> dict[str, str]:
    """Job id -> what happened to the run in that job (for `senet jobs`): its failure or preemption record,
    and for the run's current job the slow rank it last named (metrics.jsonl)."""
    said = {}
    try:
        current = str(read_job_file(Path(run_dir))["job_id"])
    except (RunFolderError, KeyError):
        current = ""
    rows = read_metrics(Path(run_dir) / METRICS)
    resumed = max((i for i, r in enumerate(rows) if r.get("event") == "resume"), default=-1)
    slow = [r for r in rows[resumed + 1:] if r.get("event") == "straggler"]
    if current and slow:
        r = slow[-1]
        said[current] = f"slow: rank {r['rank']} ({r['node']}) kept the others waiting {r['wait_s']:.2f} s per step " \
                        f"at step {r['step']}"
    for r in read_records(run_dir):
        if r.get("kind") == "preempted":
            text = f"preempted (PreemptMode={r.get('mode')})"
        else:
            text = f"{r.get('summary') or r.get('message', '')}"
        if r.get("action") == "continued":
            text += f" -> continued as job {r.get('new_job')}"
            if r.get("exclude"):
                text += f" without {','.join(r['exclude'])}"
            if r.get("new_nodes") and r.get("job_nodes") and r["new_nodes"] != r["job_nodes"]:
                text += f" on {r['new_nodes']} of its {r['job_nodes']} nodes"
        else:
            text += f"; run stopped: {r.get('reason', '')}"
        job = str(r.get("job"))
        said[job] = f"{said[job]}; {text}" if job in said else text
    return said


# -------------------------------------------------------------------------------------------- actions
def after_failure(job: RunJob, verdict: Verdict) -> None:
    """On the rank that named a failure: record it, continue the run in a new job or stop it, end this job."""
    records = read_records(job.run_dir)
    decision = decide(verdict, records, job.cfg.slurm.max_failure_requeues)
    own = os.environ.get("SLURM_JOB_ID", "")
    record: dict[str, Any] = {"time": now(), "job": own, "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                              "kind": verdict.kind, "ranks": list(verdict.ranks), "nodes": list(verdict.nodes),
                              "step": verdict.step, "error": verdict.error, "message": verdict.message,
                              "summary": summary(verdict)}
    if decision.action == "continue":
        try:
            nodes = nodes_left(job, decision.exclude)
            new, step = continue_run(job, exclude=decision.exclude, nodes=nodes)
            record.update(action="continued", new_job=new, exclude=list(decision.exclude), resume_step=step,
                          new_nodes=nodes, job_nodes=job.cfg.slurm.nodes)
        except (SubmitError, RunFolderError) as e:
            decision = Decision("stop", f"the next job could not be submitted: {e}")
    if decision.action == "stop":
        record.update(action="stopped", reason=decision.reason)
    append_record(job.run_dir, record)
    if record["action"] == "continued":  # the verdict's own line came first (training.health)
        where = f" without {', '.join(decision.exclude)}" if decision.exclude else ""
        if record["new_nodes"] != job.cfg.slurm.nodes:
            where += f" on {record['new_nodes']} of its {job.cfg.slurm.nodes} nodes (the healthy ones left)"
        log.error("%s: the run continues as job %s%s from step %s (failure %d of slurm.max_failure_requeues = %d)",
                  record["summary"], record["new_job"], where, record["resume_step"],
                  1 + sum(1 for r in records if r.get("action") == "continued" and r.get("kind") != "preempted"),
                  job.cfg.slurm.max_failure_requeues)
    else:
        log.error("%s: the run stops: %s", record["summary"], decision.reason)
    if own and (record["action"] == "continued" or verdict.kind != "error"):
        end_job(own)  # a hung rank never leaves by itself; the others may still wait for it


def after_preemption(job: RunJob, mode: str, step: int) -> str:
    """After the checkpoint at a preemption's warning, when Slurm will not requeue: the run's next job.

    Returns:
        The next job's id.

    Raises:
        SubmitError, RunFolderError: the next job could not be submitted.
    """
    own = os.environ.get("SLURM_JOB_ID", "")
    new, _ = continue_run(job, after=own or None)
    append_record(job.run_dir, {"time": now(), "job": own, "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                                "kind": "preempted", "mode": mode, "step": step, "action": "continued",
                                "new_job": new, "resume_step": step})
    return new


def continue_run(job: RunJob, exclude: tuple[str, ...] = (), after: str | None = None,
                 nodes: int | None = None) -> tuple[str, int | None]:
    """Submit the run's next job (the same config, code snapshot and run folder) from inside a job.

    Args:
        nodes: the next job's nodes (default: this job's).

    Returns:
        The new job's id and the step its newest checkpoint holds (None if there is none yet).
    """
    cfg = job.cfg if nodes in (None, job.cfg.slurm.nodes) else replace(job.cfg, slurm=replace(job.cfg.slurm, nodes=nodes))
    for name in [n for n in os.environ if (n.startswith(JOB_ENV_PREFIXES) or n in RANK_ENV) and n not in KEEP_ENV]:
        del os.environ[name]  # this process leaves next: sbatch must not take this job's facts for the next one's
    new = sbatch_job(type(job)(cfg, job.run_dir, job.workdir), cfg, job.run_dir, exclude=exclude, after=after)
    step = resume_step(job.run_dir)
    add_job(job.run_dir, new, continued=now(), resumed_from_step=step, nodes=cfg.slurm.nodes,
            tasks_per_node=tasks_per_node(cfg), gpus_per_node=cfg.slurm.gpus_per_node)
    return new, step


def nodes_left(job: RunJob, exclude: Sequence[str]) -> int:
    """The next job's nodes after a failure: the run's, or fewer when fewer healthy ones are left (`smaller_shape`)."""
    s = job.cfg.slurm
    healthy = usable_nodes(s.partition, exclude)
    try:
        virtual = started_with(peek_checkpoint(Path(job.run_dir) / CHECKPOINTS / LAST))
    except CheckpointError:
        return s.nodes  # nothing to resume yet: the run starts afresh, as configured
    return smaller_shape(s.nodes, tasks_per_node(job.cfg), virtual, healthy)


def smaller_shape(nodes: int, per_node: int, virtual_ranks: int, healthy: int | None) -> int:
    """`nodes` when that many healthy ones are left (or sinfo could not tell), else the most of the `healthy`
    whose processes (x `per_node`) divide `virtual_ranks`; `nodes` again (the job pends) when none does."""
    if healthy is None or healthy >= nodes:
        return nodes
    fits = [n for n in range(healthy, 0, -1) if virtual_ranks % (n * per_node) == 0]
    return fits[0] if fits else nodes


def usable_nodes(partition: str | None, exclude: Sequence[str]) -> int | None:
    """Nodes of the partition (every partition when None) that can take a job now or later and are not
    excluded; None when sinfo cannot say."""
    try:
        out = slurm_command("sinfo", "-h", "-N", "-o", "%N %t", *(["-p", partition] if partition else []))
    except SlurmError:
        return None
    usable = {line.split()[0] for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1] in USABLE_STATES}
    return len(usable - set(exclude))


def resume_step(run_dir: Path) -> int | None:
    try:
        return int(peek_checkpoint(Path(run_dir) / CHECKPOINTS / LAST)["step"])
    except CheckpointError:
        return None


def end_job(job_id: str) -> None:
    """Cancel this job (its steps and every rank still in them, the stopped ones included)."""
    try:
        slurm_command("scancel", job_id)
    except SlurmError as e:
        log.warning("could not cancel job %s: %s", job_id, e)


def summary(verdict: Verdict) -> str:
    """A short form of the verdict for `senet jobs`: who, where, after which step."""
    who = ", ".join(f"rank {r} ({n})" for r, n in zip(verdict.ranks, verdict.nodes)) or "a collective"
    what = {"silent": "stopped answering", "stuck": "fell behind"}.get(verdict.kind, "failed")
    cause = f": {verdict.error}" if verdict.kind in ("error", "collective") else ""
    return f"{who} {what} after step {verdict.step}{cause}"
