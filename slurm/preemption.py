"""How a preemption ends on this cluster, read from Slurm, and whether the run's checkpoints fit its warnings.

Before anything is queued `senet submit` reads the partition (`scontrol show partition`) and the
cluster (`scontrol show config`) and says in one line how a preemption will be survived:

- PreemptMode REQUEUE: Slurm requeues the job; it checkpoints at the warning and the requeued job resumes;
- CANCEL: the job is cancelled; it checkpoints at the warning (USR2 with `preempt_send_user_signal`,
  else SIGTERM) and submits the run's next job itself (`slurm.recovery`), which starts once this one ends;
- SUSPEND / GANG: the job is suspended in place and goes on where it stopped;
- OFF / preempt/none: no preemption;
- PreemptType=preempt/qos: the QOS decides, which a partition cannot tell.

The time between the warning and SIGKILL (GraceTime + KillWait at a preemption, `slurm.signal_delay_s`
before the time limit) is compared with what a checkpoint at the warning takes: up to `CHECK_EVERY`
steps to the next agreed boundary plus the write, both read from the run's own metrics.jsonl when it has
them (`senet submit --resume`). Where nothing can work - no time at all, or too little for a write the
run already made - submitting is refused (exit 2); where periodic checkpoints still carry the run it is
a warning.

In a job, at the warning, `job_preemption` says whether this job is being preempted and by which mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slurm.client import SlurmError, slurm_command
from slurm.sbatch import tasks_per_node
from training.config import Config, ConfigError, load_config
from training.metrics import read_metrics
from training.run_folder import CONFIG, METRICS

CHECK_EVERY = 2  # steps between a job's ranks' agreements on a pending signal (slurm.job's RunControl)


@dataclass(frozen=True)
class Cluster:
    """What `scontrol show config` says about preemption."""

    preempt_type: str = "preempt/none"
    preempt_mode: str = "OFF"
    kill_wait_s: int = 30
    user_signal: bool = False  # SlurmctldParameters=preempt_send_user_signal: USR2 (--signal) at preemption
    job_requeue: bool = True


@dataclass(frozen=True)
class Partition:
    name: str
    preempt_mode: str = "OFF"
    grace_s: int = 0


@dataclass(frozen=True)
class RunTimes:
    """What the run folder's metrics.jsonl says: the longest checkpoint write and the step time (None: no record)."""

    write_s: float | None = None
    step_s: float | None = None

    @classmethod
    def read(cls, run_dir: Path | None) -> RunTimes:
        if run_dir is None or not (run_dir / METRICS).is_file():
            return cls()
        rows = read_metrics(run_dir / METRICS)
        writes = [r["write_s"] for r in rows if r.get("event") == "checkpoint" and isinstance(r.get("write_s"), (int, float))]
        rates = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float)) and r["images_per_s"] > 0]
        step_s = None
        if rates and (run_dir / CONFIG).is_file():
            try:
                cfg = load_config(run_dir / CONFIG)
            except ConfigError:
                cfg = None
            if cfg is not None:  # images/s are the whole job's
                step_s = cfg.train.batch_size * cfg.slurm.nodes * tasks_per_node(cfg) / float(np.median(rates))
        return cls(max(writes) if writes else None, step_s)


@dataclass(frozen=True)
class Plan:
    """`line`: how a preemption is survived (one line); `warnings`; `fatal`: why nothing can work (exit 2)."""

    line: str
    warnings: list[str] = field(default_factory=list)
    fatal: str | None = None


def mode_of(text: str) -> str:
    """A PreemptMode value (`GANG,REQUEUE`, `cancel`, `SUSPEND,GANG`) as REQUEUE, CANCEL, SUSPEND or OFF."""
    tokens = {t.strip().upper() for t in text.split(",")}
    for mode in ("REQUEUE", "CANCEL", "SUSPEND"):
        if mode in tokens:
            return mode
    return "GANG" if "GANG" in tokens else "OFF"


def parse_config(text: str) -> Cluster:
    """`scontrol show config` output -> Cluster."""
    values = dict(re.findall(r"^(\w+)\s+= (.*?)\s*$", text, flags=re.M))
    kill_wait = re.match(r"(\d+)", values.get("KillWait", "30")) or re.match(r"(\d+)", "30")
    return Cluster(preempt_type=values.get("PreemptType", "preempt/none"),
                   preempt_mode=mode_of(values.get("PreemptMode", "OFF")), kill_wait_s=int(kill_wait.group(1)),
                   user_signal="preempt_send_user_signal" in values.get("SlurmctldParameters", ""),
                   job_requeue=values.get("JobRequeue", "1").strip() != "0")


def parse_partitions(text: str) -> dict[str, tuple[Partition, bool]]:
    """`scontrol show partition` output -> {name: (Partition, is the default)}."""
    found = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        fields = dict(re.findall(r"(\w+)=(\S*)", block))
        if "PartitionName" in fields:
            name = fields["PartitionName"]
            grace = int(fields.get("GraceTime", "0") or 0)
            found[name] = (Partition(name, mode_of(fields.get("PreemptMode", "OFF")), grace), fields.get("Default") == "YES")
    return found


def read_partition(name: str | None) -> tuple[Partition, Cluster]:
    """The partition a job of `slurm.partition` runs in (the default one when None), and the cluster's settings.

    Raises:
        SlurmError: scontrol failed or the partition is unknown.
    """
    cluster = parse_config(slurm_command("scontrol", "show", "config"))
    partitions = parse_partitions(slurm_command("scontrol", "show", "partition", *([name] if name else [])))
    if name:
        if name not in partitions:
            raise SlurmError(f"partition {name!r} unknown to scontrol")
        return partitions[name][0], cluster
    default = [p for p, is_default in partitions.values() if is_default]
    if not default:
        raise SlurmError("no default partition; name one with --partition")
    return default[0], cluster


def plan(partition: Partition, cluster: Cluster, cfg: Config, times: RunTimes = RunTimes()) -> Plan:
    """How a preemption of a job in `partition` ends, and whether the warnings leave time for a checkpoint."""
    s = cfg.slurm
    warning = "USR2" if cluster.user_signal else "SIGTERM"
    budget = partition.grace_s + cluster.kill_wait_s  # from the warning to SIGKILL
    need, known = _checkpoint_need(times)
    timing = f"GraceTime {partition.grace_s} s + KillWait {cluster.kill_wait_s} s"
    if known:
        timing += f" against ~{need:.1f} s for a checkpoint ({known})"
    warnings: list[str] = []
    fatal = None
    if times.write_s is not None and need >= s.signal_delay_s:
        fatal = (f"slurm.signal_delay_s = {s.signal_delay_s} s cannot cover a checkpoint at the time-limit warning "
                 f"(~{need:.1f} s: {known}): the job would end at its time limit before requeueing; raise "
                 f"slurm.signal_delay_s")
    if times.step_s is not None and cfg.train.checkpoint_every * times.step_s > s.time_min * 60:
        warnings.append(f"train.checkpoint_every = {cfg.train.checkpoint_every} steps take ~"
                        f"{cfg.train.checkpoint_every * times.step_s / 60:.0f} min, longer than the time limit "
                        f"({s.time_min} min): a job ended without a warning (a lost node) restarts from far back")
    where = f"partition {partition.name}"
    if cluster.preempt_type == "preempt/qos":
        line = (f"preemption on {where}: decided by QOS (PreemptType=preempt/qos), which cannot be told from the "
                f"partition; whatever it does, the run checkpoints at the {warning} and continues by itself")
    elif cluster.preempt_type in ("", "preempt/none") or partition.preempt_mode in ("OFF", "GANG"):
        line = f"preemption on {where}: none (PreemptType={cluster.preempt_type}, PreemptMode={partition.preempt_mode})"
    elif partition.preempt_mode == "SUSPEND":
        line = (f"preemption on {where}: the job is suspended in place (PreemptMode=SUSPEND) and goes on where it "
                f"stopped; a suspension longer than the collectives' timeout (train.dist_timeout_s = "
                f"{cfg.train.dist_timeout_s} s and a little) fails them, and the run continues in a new job")
    elif partition.preempt_mode == "REQUEUE":
        line = (f"preemption on {where}: Slurm requeues the job (PreemptMode=REQUEUE); it checkpoints at the "
                f"{warning} ({timing}) and the requeued job resumes from it")
        if budget <= 0 or (known and need >= budget):
            warnings.append(f"{where}: too little time after the warning for a checkpoint ({timing}); the "
                            f"requeued job resumes from the last periodic one (up to train.checkpoint_every = "
                            f"{cfg.train.checkpoint_every} steps lost)")
    else:  # CANCEL
        line = (f"preemption on {where}: Slurm cancels the job (PreemptMode=CANCEL); it checkpoints at the {warning} "
                f"({timing}) and submits the run's next job itself, which resumes from it")
        if budget <= 0:
            fatal = fatal or (f"{where} cancels a preempted job with no signal time at all (GraceTime 0, KillWait 0): "
                              f"the run could neither checkpoint nor continue; pick another partition")
        elif known and need >= budget:
            fatal = fatal or (f"{where} cancels a preempted job {budget} s after the warning ({timing}): the run could "
                              f"not checkpoint and continue; pick another partition or checkpoint faster")
    return Plan(line, warnings, fatal)


def _checkpoint_need(times: RunTimes) -> tuple[float, str]:
    """Seconds a checkpoint at the warning takes (steps to the agreed boundary + the write) and what it rests on."""
    parts, need = [], 0.0
    if times.step_s is not None:
        need += CHECK_EVERY * times.step_s
        parts.append(f"{CHECK_EVERY} steps of {times.step_s:.2f} s")
    if times.write_s is not None:
        need += times.write_s
        parts.append(f"writes so far up to {times.write_s:.2f} s")
    return need, " + ".join(parts)


# ------------------------------------------------------------------------------------------ in a job
def job_preemption(job_id: str) -> str | None:
    """Whether Slurm is preempting this job (PreemptTime set) and how: REQUEUE, CANCEL, SUSPEND, or '?' when it
    cannot tell (QOS preemption whose mode sacctmgr does not say); None when the job is not being preempted."""
    try:
        shown = slurm_command("scontrol", "show", "job", job_id)
    except SlurmError:
        return "?"
    fields = dict(re.findall(r"(\w+)=(\S*)", shown))
    if fields.get("PreemptTime", "None") in ("None", "Unknown", ""):
        return None
    try:
        partition, cluster = read_partition(fields.get("Partition") or None)
    except SlurmError:
        return "?"
    if cluster.preempt_type != "preempt/qos":
        return partition.preempt_mode
    try:
        mode = slurm_command("sacctmgr", "-n", "-P", "show", "qos", fields.get("QOS", ""), "format=PreemptMode").strip()
    except SlurmError:
        return "?"
    if mode.lower() == "cluster":
        return cluster.preempt_mode
    return mode_of(mode) if mode else "?"
