"""How code outside the training loop (a signal handler, a Slurm job) asks a run for a checkpoint and a stop."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class RunControl:
    """Lets code outside the loop (a signal handler, on any rank) ask for a checkpoint and a clean stop.

    Safe to call from a signal handler: it only sets flags. Every rank must pass a RunControl (or
    every rank None) with the same `check_every`, because the ranks agree on the flags collectively.
    Subclass it (or assign `on_checkpoint_saved`) to act once the requested checkpoint is on disk,
    e.g. to requeue a Slurm job, and `on_rank_failure` to act when a rank failed, e.g. to continue a
    Slurm run in a new job.
    """

    def __init__(self, check_every: int = 10) -> None:
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be >= 1")
        self.check_every = check_every  # steps between agreements: a request waits at most this many steps
        self.checkpoint_requested = False
        self.stop_after_checkpoint = False

    def request_checkpoint(self, stop: bool = False) -> None:
        """Ask for a checkpoint at the next agreed step boundary; `stop=True` also ends the run after it."""
        self.checkpoint_requested = True
        self.stop_after_checkpoint = self.stop_after_checkpoint or stop

    def on_checkpoint_saved(self, path: Path, step: int) -> None:
        """Called on every rank once a requested checkpoint is complete on disk (rank 0 wrote it)."""

    def shape_facts(self) -> dict[str, Any]:
        """What the launcher knows about where the run goes on now (e.g. a Slurm job and its attempt), recorded
        with each start's shape in RUN/shapes.jsonl; nothing by default."""
        return {}

    def on_rank_failure(self, verdict: Any) -> None:
        """Called on the one rank that names a failure (a `training.health.Verdict`), before it leaves.

        It may run on the heartbeat thread while the main thread is blocked in a collective; the process
        ends right after it returns.
        """
