"""The slow rank of a DDP run: the one the others wait for at the gradient all-reduce, named with its node.

Under DDP every rank's step takes as long as the slowest rank's, so step times cannot say which rank is
slow. Waiting times can: each rank times how long it waits where DDP holds the ranks together (the
buffer broadcast at the start of the forward, the gradient all-reduce: `SyncTimer`) - the rank that
arrives last waits least. Every `window` steps (a multiple of `train.log_every`, at least `MIN_WINDOW`)
the ranks gather those waits on the control group, and a rank that arrived last in most of the window's
steps in which anyone kept the others waiting, at an average cost of a noticeable share of the step
(`MIN_SHARE`, at least `MIN_WAIT_S`), in two windows running (one alone is often a busy host's noise),
is named (`slowest`): a warning in the log (rank 0,
when it starts, moves or ends) and a `straggler` event in metrics.jsonl at every window it lasts: `{"event": "straggler", "step", "rank", "node", "host", "last_in",
"window", "wait_s", "step_s"}`.

On the CPU (gloo) the times are host clocks; on the GPU they are CUDA events on the device's stream,
read once per window.

Test hook: `SENET_TEST_SLOW_RANK=RANK:SECONDS` (read at start) makes that rank sleep SECONDS after every
step, a deterministic slow rank for tests and demonstrations.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from training.config import ConfigError
from training.health import RankInfo
from training.metrics import MetricsLog

log = logging.getLogger("senet.train")

SLOW_RANK_ENV = "SENET_TEST_SLOW_RANK"
MIN_WINDOW = 8  # steps in a decision: fewer would name whoever the machine's noise put last twice
MIN_SHARE = 0.2  # the others must wait at least this share of the step for the slow rank ...
MIN_WAIT_S = 0.02  # ... and at least this long (less is within the noise of a loaded host)


def slow_down_from_env(rank: int, env: dict[str, str] | None = None) -> float:
    """Seconds this rank sleeps after each step under `SENET_TEST_SLOW_RANK=RANK:SECONDS` (else 0).

    Raises:
        ConfigError: a value that is not RANK:SECONDS.
    """
    text = (os.environ if env is None else env).get(SLOW_RANK_ENV, "").strip()
    if not text:
        return 0.0
    try:
        who, seconds = text.split(":")
        slow_rank, delay = int(who), float(seconds)
    except ValueError:
        raise ConfigError(f"{SLOW_RANK_ENV}={text!r}: expected RANK:SECONDS, e.g. 1:0.2") from None
    if delay < 0 or not math.isfinite(delay):
        raise ConfigError(f"{SLOW_RANK_ENV}={text!r}: SECONDS must be a finite number >= 0")
    return delay if slow_rank == rank else 0.0


@dataclass(frozen=True)
class Straggler:
    """The rank named slow in one window."""

    rank: int
    last_in: int  # steps of the window in which the others waited for it
    window: int
    wait_s: float  # how long the others waited for it per step, on average over the window


def slowest(waits: np.ndarray, step_s: float) -> Straggler | None:
    """The rank the others waited for in most of the window's waiting steps, at a real cost; else None.

    In a step, rank r is behind when the others' median wait exceeds its own by at least
    max(`MIN_WAIT_S`, `MIN_SHARE` x the step): it arrived last (waited least) while they waited for it.
    Against the others' median rather than their minimum, so that another rank's occasional stumble
    does not hide one that is behind step after step. The rank named was behind in most of the steps
    in which anyone was (on a host whose input is bursty, no rank may keep the others waiting in
    every step), and cost the others at least that threshold per step on average over the window.

    Args:
        waits: seconds each rank (row) waited in each step (column).
        step_s: the median step time of the window.
    """
    ranks, steps = waits.shape
    if ranks < 2 or steps < 1:
        return None
    others = np.stack([np.median(np.delete(waits, r, axis=0), axis=0) for r in range(ranks)])
    lag = others - waits  # how long the others waited for each rank, per step
    threshold = max(MIN_WAIT_S, MIN_SHARE * step_s)
    behind = lag >= threshold
    rank = int(behind.sum(axis=1).argmax())
    waiting_steps = int(behind.any(axis=0).sum())
    cost = float(np.clip(lag[rank], 0, None).mean())
    if behind[rank].sum() * 2 <= waiting_steps or cost < threshold:
        return None
    return Straggler(rank, int(behind[rank].sum()), steps, cost)


class SyncTimer:
    """How long this rank waits for the others at each step: where DDP synchronises the ranks.

    DDP synchronises twice per step: at the start of the forward (the buffer broadcast, when the model
    has buffers and DDP broadcasts them) and at the gradient all-reduce. The first wait is the time
    from entering DDP's forward to the wrapped module's forward starting; the second, the time from the
    step's last gradient bucket being ready on this rank to its all-reduce completing. A step's wait is
    their sum: whichever of them holds the ranks together carries it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._enter: Any = None  # DDP's forward entered, the module's not yet
        self._forward: Any = None  # (entered, module started) of the step in progress
        self._bucket: Any = None  # (ready, reduced) of the latest bucket of the step in progress
        self._steps: list[tuple[Any, Any]] = []

    def attach(self, ddp: nn.Module, hook: Callable) -> None:
        """Time `ddp` (a DistributedDataParallel) whose gradients `hook` (a DDP communication hook) reduces."""
        ddp.register_forward_pre_hook(self._entered)
        ddp.module.register_forward_pre_hook(self._started)  # also runs for the bare model (eval): paired only
        ddp.register_comm_hook(None, self._timed(hook))

    def _entered(self, module: nn.Module, args: Any) -> None:
        self._enter = self._now()

    def _started(self, module: nn.Module, args: Any) -> None:
        if self._enter is not None:
            self._forward, self._enter = (self._enter, self._now()), None

    def _timed(self, hook: Callable) -> Callable:
        def timed(state, bucket):  # noqa: ANN001, ANN202 - DDP inspects a hook's annotations at run time
            ready = self._now()
            future = hook(state, bucket)

            def done(fut):  # noqa: ANN001, ANN202
                value = fut.value()  # re-raises the collective's failure
                self._bucket = (ready, self._now())
                return value

            return future.then(done)

        return timed

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream, in order with the work before and after it
        return event

    def step_done(self) -> None:
        self._steps.append((self._forward, self._bucket))
        self._forward = self._bucket = None

    def take(self) -> list[float]:
        """The waits of the steps since the last call, in seconds (NaN where a step had no all-reduce)."""
        steps, self._steps = self._steps, []
        return [math.nan if bucket is None else self._seconds(forward) + self._seconds(bucket)
                for forward, bucket in steps]

    def _seconds(self, pair: Any) -> float:
        if pair is None:
            return 0.0
        if not self.cuda:
            return pair[1] - pair[0]
        pair[1].synchronize()
        return pair[0].elapsed_time(pair[1]) / 1000


class StragglerWatch:
    """Names the slow rank of the run every window (see the module docstring); a no-op in a single process.

    Args:
        infos: every rank's identity, in rank order (`training.health.Health.infos`).
        rank: this rank. log_every: `train.log_every` (windows are whole multiples of it).
        timer: the SyncTimer registered on the DDP model (None: nothing to time).
        slow_down_s: this rank's injected sleep after each step (the test hook).
    """

    def __init__(self, infos: dict[int, RankInfo], rank: int, log_every: int, timer: SyncTimer | None,
                 slow_down_s: float = 0.0) -> None:
        self.infos, self.rank, self.timer = infos, rank, timer
        self.window = log_every * math.ceil(MIN_WINDOW / log_every)
        self.slow_down_s = slow_down_s
        self.named: int | None = None
        self._previous: int | None = None  # the rank found in the last window: named when found twice in a row
        self._waits: list[float] = []
        self._ends: list[float] = [time.perf_counter()]  # when each step of the window ended

    def step_done(self) -> None:
        if self.slow_down_s:
            time.sleep(self.slow_down_s)
        if self.timer is not None:
            self.timer.step_done()
            self._ends.append(time.perf_counter())

    def window_done(self, step: int, group: Any, metrics: MetricsLog) -> Straggler | None:
        """At a log step: once a window is full, gather every rank's waits (a collective) and name the slow rank
        (the one found in this window and the one before)."""
        if self.timer is None:
            return None
        self._waits += self.timer.take()
        if len(self._waits) < self.window:
            return None
        mine = torch.tensor(self._waits, dtype=torch.float64)
        step_s = float(np.median(np.diff(self._ends)))  # the median: validation and checkpoints fall between steps
        self._waits, self._ends = [], self._ends[-1:]
        everyone = [torch.empty_like(mine) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(everyone, mine, group=group)
        waits = torch.stack(everyone).numpy()
        waits = waits[:, ~np.isnan(waits).any(axis=0)]
        found = slowest(waits, step_s)
        confirmed = found if found is not None and found.rank == self._previous else None
        self._previous = found.rank if found is not None else None
        self._report(step, confirmed, step_s, metrics)
        return confirmed

    def _report(self, step: int, found: Straggler | None, step_s: float, metrics: MetricsLog) -> None:
        if self.rank != 0:
            return
        if found is None:
            if self.named is not None:
                log.info("rank %d is no longer the slowest (no rank keeps the others waiting)", self.named)
            self.named = None
            return
        info = self.infos[found.rank]
        metrics.write({"event": "straggler", "step": step, "rank": found.rank, "node": info.node, "host": info.host,
                       "last_in": found.last_in, "window": found.window, "wait_s": round(found.wait_s, 4),
                       "step_s": round(step_s, 4)})
        if found.rank != self.named:
            log.warning("slow rank: rank %d (%s) arrived last where DDP synchronises the ranks in %d of %d steps; the "
                        "others waited %.3f s per step for it (%.0f%% of a %.3f s step)", found.rank, info.where(),
                        found.last_in, found.window, found.wait_s, 100 * found.wait_s / max(step_s, 1e-9), step_s)
        self.named = found.rank
