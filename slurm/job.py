"""The Slurm job: a checkpointable callable that runs `training.engine.run` as one task (one rank).

It pickles only its config and two folders and resumes from disk: a requeued job is
the same `TrainJob`, and `run(resume="auto")` continues from the newest checkpoint in RUN/checkpoints that
verifies (the log says in one line which newer one was damaged, if any). When checkpoints exist but none
verifies, or one cannot be written, the task ends with one line in the log and exit status 2 or 1.

Signals. Slurm warns a job with USR2 (`--signal=USR2@delay` before
the time limit, and at preemption with `preempt_send_user_signal`), then sends SIGTERM (at the limit,
after GraceTime, or alone for `scontrol requeue` / `scancel`), then SIGKILL. submitit's own USR2 handler
would, on rank 0 only, pickle `checkpoint()`, `scontrol requeue` the job and exit at once: from inside
whatever step rank 0 was in, with the other ranks left in a collective and nothing saved since the last
periodic checkpoint. So each task replaces that handler while it runs:

1. USR2 (any rank) and SIGTERM only set flags: `RunControl.request_checkpoint(stop=True)`. Handlers that
   only set flags are safe whatever the main thread is doing (NCCL included; USR1 is NCCL's, not ours).
2. The engine's ranks agree on the request every `CHECK_EVERY` steps, checkpoint at the same step boundary,
   wait until rank 0's (background) write has landed, and call `on_checkpoint_saved` on every rank.
3. There the ranks agree whether anyone saw USR2. If so, rank 0 hands over to submitit's saved handler,
   which does what it always does (pickle the DelayedSubmission, `scontrol requeue`, exit); the others
   leave without a result. The requeue happens after the checkpoint, never before.
   With SIGTERM only, every rank leaves after the checkpoint and Slurm does what it was doing
   (requeue, cancel, time limit); that checkpoint is a bonus: periodic ones (`train.checkpoint_every`)
   are what requeues without a signal (node failure, `scontrol requeue` with a short KillWait) resume from.

4. A preemption that Slurm will not requeue (PreemptMode=CANCEL, or a QOS preemption whose mode cannot be
   told): after that checkpoint rank 0 submits the run's next job, to start once this one has ended
   (`slurm.recovery.after_preemption`), and every rank leaves.

A rank that hangs, dies or fails is named by `training.health`; the rank that claims the verdict calls
`on_rank_failure`, which continues the run in a new job without the suspect node, or stops it for a
deterministic failure (`slurm.recovery`); every rank then leaves without a traceback of its own.

DALI's Python workers ignore SIGTERM inside a job (pipeline.loader), so a warning never kills the input.
Budget: `slurm.signal_delay_s` (time limit) and the partition's GraceTime (preemption) must cover
CHECK_EVERY steps plus one checkpoint write (`senet submit` checks: slurm.preemption).
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import submitit
import torch

from slurm import recovery
from slurm.client import SubmitError
from slurm.job_folder import RunFolderError
from slurm.preemption import CHECK_EVERY, job_preemption
from training.checkpoint import ResumeError
from training.config import Config
from training.control import RunControl
from training.engine import run
from training.health import RankFailure, Verdict
from training.placement import place_run
from training.ranks import DistInfo

log = logging.getLogger("senet.slurm")

PORT_RANGE = (20000, 32768)  # rendezvous ports: below Linux's ephemeral range (32768-60999)


class TrainJob(submitit.helpers.Checkpointable):
    """One rank of a training run; submitit starts it in every task and requeues it on USR2.

    Args:
        cfg: the resolved configuration.
        run_dir: the run folder (absolute; shared by all nodes).
        workdir: the folder `senet submit` ran in; relative paths in `cfg` are relative to it.
    """

    def __init__(self, cfg: Config, run_dir: Path, workdir: Path) -> None:
        self.cfg = cfg  # never the model or loaders: this object is pickled again on every requeue
        self.run_dir = Path(run_dir)
        self.workdir = Path(workdir)

    def __call__(self) -> dict[str, Any]:
        dist = rendezvous()
        configure_logging(dist)
        if self.workdir.is_dir():
            os.chdir(self.workdir)
        else:
            log.warning("submission folder %s is not visible here; relative config paths are taken from %s",
                        self.workdir, Path.cwd())
        control = SlurmControl(dist, self, check_every=CHECK_EVERY)
        control.install()
        if dist.is_main:
            log.info("job %s, attempt %s: %d ranks on %s, run folder %s, code from %s", os.environ.get("SLURM_JOB_ID"),
                     int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1, dist.world_size,
                     os.environ.get("SLURM_JOB_NODELIST"), self.run_dir, Path(__file__).resolve().parents[1])
        try:
            summary = run(self.cfg, place_run(self.cfg, dist), self.run_dir, resume="auto", control=control)
        except RankFailure:  # another rank hung, died or failed: named, and acted on, by the rank that claimed it
            raise SystemExit(1) from None
        except ResumeError as e:  # before the loop: checkpoints exist but none verifies (every rank raises it)
            if dist.is_main:
                log.error("%s", e)
            raise SystemExit(2) from None
        except Exception as e:
            if recovery.is_deterministic(type(e)):  # a checkpoint that cannot be written, a NaN loss, bad data...
                raise SystemExit(1) from None  # said in one line by the rank that claimed it; no traceback
            raise  # an unexpected exception: its traceback belongs in the log (the run already went on, or stopped)
        if summary["stopped"]:
            control.leave()
        return summary


class SlurmControl(RunControl):
    """RunControl for a Slurm task: USR2 and SIGTERM ask for a checkpoint and a stop; USR2 then requeues, a
    preemption Slurm will not requeue submits the run's next job, and a rank's failure continues the run
    elsewhere (`slurm.recovery`)."""

    def __init__(self, dist: DistInfo, job: TrainJob, check_every: int = CHECK_EVERY) -> None:
        super().__init__(check_every)
        self.dist, self.job = dist, job
        self.continued: str | None = None  # the run's next job, submitted after a CANCEL preemption
        # USR2, unless SUBMITIT_PREEMPT_SIGNAL names another (never USR1: NCCL's)
        self.warn_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self.requeue_handler: Callable[[int, FrameType | None], Any] | None = None
        self.warned = False  # USR2 seen by this rank
        self.terminated = False  # SIGTERM seen by this rank

    def install(self) -> None:
        """Take over USR2 (keeping submitit's handler for the requeue) and SIGTERM. Main thread only."""
        previous = signal.getsignal(self.warn_signal)
        self.requeue_handler = previous if callable(previous) else None
        signal.signal(self.warn_signal, self._on_warning)
        signal.signal(signal.SIGTERM, self._on_terminate)

    def _on_warning(self, signum: int, frame: FrameType | None) -> None:
        self.warned = True
        self.request_checkpoint(stop=True)

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        self.request_checkpoint(stop=True)

    def on_checkpoint_saved(self, path: Path, step: int) -> None:
        """Every rank, at the same step boundary, with the checkpoint on disk: requeue when USR2 came."""
        self.warned = any_rank(self.warned)  # a collective: every rank is here
        if not self.dist.is_main:
            return
        why = "the time-limit/preemption signal" if self.warned else "SIGTERM"
        log.info("checkpoint at step %d written after %s: %s", step, why, path)
        mode = job_preemption(os.environ.get("SLURM_JOB_ID", ""))
        if mode is not None and mode not in ("REQUEUE", "SUSPEND"):  # Slurm will not bring this job back
            try:
                self.continued = recovery.after_preemption(self.job, mode, step)
                log.info("preempted (PreemptMode=%s): the run continues as job %s once this one ends", mode,
                         self.continued)
                return
            except (SubmitError, RunFolderError) as e:
                log.error("preempted (PreemptMode=%s), and the next job could not be submitted: %s", mode, e)
        if self.warned and self.requeue_handler is not None:
            try:
                self.requeue_handler(self.warn_signal, None)  # submitit: checkpoint() pickled, scontrol requeue, exit
            except subprocess.CalledProcessError as e:  # e.g. a preempted job that Slurm is requeueing itself
                log.warning("scontrol requeue failed (%s); a preempted job is requeued by Slurm itself", e)
                raise SystemExit(1) from None

    def shape_facts(self) -> dict[str, Any]:
        """The job and its attempt, for RUN/shapes.jsonl (the engine adds processes, nodes and virtual ranks)."""
        return {"job": os.environ.get("SLURM_JOB_ID", ""), "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1}

    def on_rank_failure(self, verdict: Verdict) -> None:
        """On the rank that named a failure: continue the run in a new job without the suspect node, or stop it."""
        recovery.after_failure(self.job, verdict)

    def leave(self) -> None:
        """After a stop for a signal: end this task without a result, so submitit never reads one."""
        if self.continued:
            raise SystemExit(0)
        if self.dist.is_main and self.warned and self.requeue_handler is not None:
            # USR2 reached rank 0 only after the ranks agreed (scancel --signal TERM, then USR2): requeue now.
            self.requeue_handler(self.warn_signal, None)
        if self.dist.is_main:
            log.info("stopped for SIGTERM; Slurm requeues or ends the job")
        raise SystemExit(0)  # 0: a cluster with KillOnBadExit must not kill rank 0 before it requeues


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on any rank (one MAX all-reduce; a plain bool without a process group)."""
    if not torch.distributed.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def rendezvous() -> DistInfo:
    """torchrun's variables from submitit's environment, with a port that differs per cluster, job and attempt.

    submitit derives MASTER_PORT from the job id alone: two clusters on one host (two checkouts' local test
    clusters) hand out the same ids, and a requeued attempt would bind the port its predecessor just left.
    """
    env = submitit.JobEnvironment()
    key = f"{os.environ.get('SLURM_CLUSTER_NAME', '')}:{env.job_id}:{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    os.environ["MASTER_PORT"] = str(PORT_RANGE[0] + digest % (PORT_RANGE[1] - PORT_RANGE[0]))
    # CUDA_VISIBLE_DEVICES stays as Slurm set it (the node's GPUs for this job, or this task's own): the
    # placement picks cuda:(LOCAL_RANK mod visible GPUs), and DALI uses the same index.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return DistInfo.from_env()


def configure_logging(dist: DistInfo) -> None:
    """Progress on rank 0, warnings from every rank, each line naming its rank (logs are per rank anyway)."""
    handler = logging.StreamHandler(sys.stderr)  # submitit logs its own lines to stdout
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [rank {dist.rank}]: %(message)s"))
    logger = logging.getLogger("senet")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if dist.is_main else logging.WARNING)
