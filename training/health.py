"""Which rank stopped answering, on which node, after which step: heartbeats, a watchdog and one verdict.

Under DDP every rank waits for every other at each step, so one hung (SIGSTOP, a deadlock) or dead
(SIGKILL, a lost node) rank stops them all, and a collective that gives up says only that *something*
timed out or closed. So each rank of a distributed run:

- beats: a thread rewrites RUN/health/<session>/rank-<r>.json every `interval` seconds (rank, node,
  host, pid, the last step it finished, a counter). A stopped or dead process stops beating; one that
  merely waits in a collective keeps beating. The run folder is on storage every node sees.
- watches: once its own loop has made no progress for two beats, it reads the others' files at each
  beat; a rank whose counter has not moved for `train.dist_timeout_s` is named and the run stops (the
  collectives' own timeout comes later, `training.dist.process_group_timeout`).
- fails once: whichever comes first - the watchdog, a collective that raises (gloo raises at once when a
  dead peer's connection closes), or an exception of this rank's own - makes a `Verdict`: who, where,
  the last step each reached, why. The first rank to claim RUN/health/<session>/verdict.json acts on it
  (the `on_failure` callback: `RunControl.on_rank_failure`, e.g. continue a Slurm run elsewhere) and
  logs its one line; the others leave quietly.

A single-process run has no heartbeats; its own exceptions still get a verdict (and the callback).
Measured times from a fault to the named line and to training again: benchmarks/RESULTS_faults.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.distributed as tdist

from training.run_folder import HEALTH

log = logging.getLogger("senet.health")

VERDICT = "verdict.json"  # RUN/health/<session>/verdict.json, beside each rank's rank-<r>.json
RUN_ID_ENV = "SENET_RUN_ID"  # set by `senet train --nproc` so that it finds its ranks' verdict
# A collective failed because a peer did (its message names no rank): gloo's and NCCL's words for it.
COLLECTIVE_WORDS = ("gloo", "NCCL", "c10d", "ProcessGroup", "Connection closed by peer", "Connection reset by peer",
                    "Timed out waiting", "Socket Timeout", "Broken pipe")
RUNNING, FAILED, ERROR, DONE = "running", "failed", "error", "done"  # FAILED: saw a collective fail, still alive
LEAVE_TIMEOUT_S = 120.0  # a main thread that found the watchdog handling a failure waits this long for the exit


def heartbeat_interval(dist_timeout_s: float) -> float:
    """Seconds between beats: a thirtieth of the silence that names a rank, within [1, 5]."""
    return min(5.0, max(1.0, dist_timeout_s / 30))


def is_collective_error(e: BaseException) -> bool:
    """An exception that says a collective failed (a consequence of some rank's failure, not a cause)."""
    return isinstance(e, tdist.DistError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in COLLECTIVE_WORDS))


def describe(e: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs: its Slurm node (SLURMD_NODENAME: every local test node's hostname is the same),
    its host and its process."""

    rank: int
    node: str
    host: str
    pid: int

    @classmethod
    def here(cls, rank: int) -> RankInfo:
        host = socket.gethostname()
        return cls(rank, os.environ.get("SLURMD_NODENAME") or host, host, os.getpid())

    def where(self) -> str:
        place = f"node {self.node}" if self.node == self.host else f"node {self.node}, host {self.host}"
        return f"{place}, pid {self.pid}"


@dataclass(frozen=True)
class Beat:
    """One heartbeat file: a rank's identity, the last step it finished, a counter and its state."""

    rank: int
    node: str
    host: str
    pid: int
    step: int
    seq: int
    state: str = RUNNING
    error: str = ""
    session: str = ""

    @property
    def info(self) -> RankInfo:
        return RankInfo(self.rank, self.node, self.host, self.pid)


@dataclass(frozen=True)
class Verdict:
    """What stopped a run, named once, by the rank that claimed it.

    kind: "silent" (hung or dead: no heartbeat), "error" (a rank raised an exception of its own),
    "stuck" (alive but behind the others when the collective timed out), "collective" (a collective
    failed and no rank could be blamed).
    """

    kind: str
    message: str
    ranks: tuple[int, ...] = ()
    nodes: tuple[str, ...] = ()
    steps: tuple[int, ...] = ()  # the last step each named rank finished
    error: str = ""  # `Type: message` of the rank that raised
    error_types: tuple[str, ...] = ()  # its exception's class and base classes (to tell deterministic failures)
    step: int = 0  # the last step the reporting rank finished
    reporter: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


class RankFailure(Exception):
    """The run stopped because a rank failed; `verdict` names it and `claimed` says whether this rank acted."""

    def __init__(self, verdict: Verdict, claimed: bool) -> None:
        super().__init__(verdict.message)
        self.verdict, self.claimed = verdict, claimed


# --------------------------------------------------------------------------------------------- verdicts
def ranks_phrase(beats: list[Beat], infos: dict[int, RankInfo]) -> str:
    """`rank 1 (node node2, pid 42; last step 14)` or `ranks 1 (...; last step 14) and 3 (...; last step 14)`."""
    parts = [f"{b.rank} ({(infos.get(b.rank) or b.info).where()}; "
             f"{f'last step {b.step}' if b.step >= 0 else 'no heartbeat readable'})" for b in beats]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return ("rank " if len(parts) == 1 else "ranks ") + joined


def diagnose(me: RankInfo, step: int, beats: dict[int, Beat | None], silent: dict[int, float],
             infos: dict[int, RankInfo], collective: str = "") -> Verdict:
    """The verdict of a rank whose collective failed or whose watchdog found silent ranks.

    Args:
        me: the reporting rank; step: the last step it finished.
        beats: every other rank's last heartbeat (None: none readable).
        silent: ranks whose heartbeat did not move, and for how many seconds it had not.
        infos: every rank's identity, as gathered at the start.
        collective: the failed collective's error, when one failed.
    """
    errors = [b for b in beats.values() if b is not None and b.state == ERROR]
    if errors:  # a rank raised; the others' collectives failed because it left
        first = errors[0]
        return Verdict("error", f"{ranks_phrase(errors, infos)} failed: {first.error}", tuple(b.rank for b in errors),
                       tuple(infos[b.rank].node for b in errors), tuple(b.step for b in errors), error=first.error,
                       step=step, reporter=me.rank)
    if silent:
        # DDP is lock-step: a silent rank took part in every step the reporter finished, whatever its last
        # heartbeat (written every few seconds) said.
        named = [replace(beats.get(r) or Beat(r, infos[r].node, infos[r].host, infos[r].pid, -1, -1),
                         step=max(step, beats[r].step if beats.get(r) else -1)) for r in sorted(silent)]
        quiet = min(silent.values())
        how = "dead (its connection closed)" if any(w in collective for w in ("Connection closed", "Connection reset")) \
            else "hung or dead"
        return Verdict("silent", f"{ranks_phrase(named, infos)} stopped answering: {how}, no heartbeat for "
                                 f"{quiet:.0f} s; rank {me.rank} stops after step {step}", tuple(b.rank for b in named),
                       tuple(infos[b.rank].node for b in named), tuple(b.step for b in named), step=step, reporter=me.rank)
    alive = [b for b in beats.values() if b is not None]
    front = max([step, *(b.step for b in alive)])
    behind = [b for b in alive if b.step < front]
    if behind and step == front:
        return Verdict("stuck", f"{ranks_phrase(behind, infos)} still answer{'s' if len(behind) == 1 else ''} but "
                                f"fell behind: the others finished step {front} and their collective timed out",
                       tuple(b.rank for b in behind), tuple(infos[b.rank].node for b in behind),
                       tuple(b.step for b in behind), error=collective, step=step, reporter=me.rank)
    return Verdict("collective", f"a collective failed after step {step} and every rank still answers: {collective}",
                   error=collective, step=step, reporter=me.rank)


def own_verdict(me: RankInfo, step: int, e: BaseException) -> Verdict:
    """The verdict of a rank that raised an exception of its own."""
    types = tuple(c.__name__ for c in type(e).__mro__ if c not in (object, BaseException))
    beat = Beat(me.rank, me.node, me.host, me.pid, step, 0)
    return Verdict("error", f"{ranks_phrase([beat], {me.rank: me})} failed: {describe(e)}", (me.rank,),
                   (me.node,), (step,), error=describe(e), error_types=types, step=step, reporter=me.rank)


def read_verdict(folder: Path) -> Verdict | None:
    """The verdict claimed in a session folder (RUN/health/<session>), if any."""
    try:
        return Verdict.from_dict(json.loads((folder / VERDICT).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def session_folder(run_dir: Path, session: str) -> Path:
    return Path(run_dir) / HEALTH / session


# ----------------------------------------------------------------------------------------------- health
class Health:
    """Heartbeats, the watchdog and the verdict of one rank (see the module docstring).

    Args:
        me: this rank. infos: every rank, in rank order.
        folder: the session folder (RUN/health/<session>); None switches heartbeats off (single process).
        dist_timeout_s: silence after which a rank is named (`train.dist_timeout_s`).
        on_failure: called with the verdict on the rank that claims it, before that rank leaves.
    """

    def __init__(self, me: RankInfo, infos: list[RankInfo], folder: Path | None, dist_timeout_s: float,
                 on_failure: Callable[[Verdict], None] | None = None) -> None:
        self.me, self.infos = me, {i.rank: i for i in infos}
        self.folder = folder
        self.silence_s = float(dist_timeout_s)
        self.interval = heartbeat_interval(dist_timeout_s)
        self.on_failure = on_failure or (lambda verdict: None)
        self.step = 0
        self.watching = folder is not None  # reads the others' beats when the loop stalls
        self.claimed: Verdict | None = None
        self._state, self._error = RUNNING, ""
        self._seq = 0
        self._progress = time.monotonic()
        self._failing = threading.Lock()  # taken once, by the first path that handles a failure; never released
        self._writing = threading.Lock()  # the thread and a failing main thread both write this rank's beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="senet-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, run_dir: Path, dist_timeout_s: float, group: Any = None,
              on_failure: Callable[[Verdict], None] | None = None) -> Health:
        """Agree on a session with the other ranks, write the first beat and start beating and watching.

        A collective: every rank calls it once the process group is up (a single process gets a Health
        without heartbeats).
        """
        me = RankInfo.here(rank)
        if world_size < 2 or not tdist.is_initialized():
            return cls(me, [me], None, dist_timeout_s, on_failure)
        proposal = os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex[:12]
        everyone: list[Any] = [None] * world_size
        tdist.all_gather_object(everyone, (me, proposal), group=group)
        session = everyone[0][1]  # rank 0's
        folder = session_folder(run_dir, session)
        folder.mkdir(parents=True, exist_ok=True)
        health = cls(me, [info for info, _ in everyone], folder, dist_timeout_s, on_failure)
        health._beat()
        tdist.barrier(group=group)  # every first beat is written
        health.watching = health._others_visible()
        if not health.watching:
            log.warning("rank %d cannot read the other ranks' heartbeats in %s (is the run folder on storage every "
                        "node sees?): a hung rank is left to the collectives' own timeout", rank, folder)
        if rank == 0:
            prune_sessions(folder.parent, keep=session)
        health._thread.start()
        return health

    def _others_visible(self, patience_s: float = 3.0) -> bool:
        """Whether this rank sees every other rank's first beat (a shared file system may show it late)."""
        deadline = time.monotonic() + patience_s
        while any(beat is None for beat in self._read_peers().values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    # ------------------------------------------------------------------------------- the loop's hooks
    def step_done(self, step: int) -> None:
        """The loop finished `step` (cheap: two assignments; the thread writes it at the next beat)."""
        self.step = step
        self._progress = time.monotonic()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around the training loop: a failure leaves it as one verdict.

        A collective that failed becomes a `RankFailure` naming the rank(s) to blame; an exception of this
        rank's own is re-raised unchanged once its verdict is out (the other ranks read it).
        """
        try:
            yield
        except Exception as e:
            verdict = self.fail(e)
            if verdict is None:  # this process's watchdog is handling a failure and will end the process
                self._stop.wait(LEAVE_TIMEOUT_S)
                raise RankFailure(self.claimed or diagnose(self.me, self.step, {}, {}, self.infos, describe(e)),
                                  False) from e
            if is_collective_error(e):
                raise RankFailure(verdict, self.claimed is verdict) from e
            raise

    def close(self) -> None:
        """Stop beating; a rank that ends normally says so (`done`), so that nobody names it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval)
        if self.folder is not None and self._state == RUNNING:
            self._state = DONE
            self._beat()

    # ---------------------------------------------------------------------------------- failing once
    def fail(self, exc: BaseException | None, silent: dict[int, float] | None = None,
             beats: dict[int, Beat | None] | None = None) -> Verdict | None:
        """Make this rank's verdict, claim it if nobody has, and act on it once; None if already failing here.

        Args:
            exc: the exception that ended the loop (None: the watchdog found `silent` ranks).
            silent: ranks already known silent, with their silence in seconds (the watchdog's).
            beats: the others' heartbeats read with `silent`.
        """
        if not self._failing.acquire(blocking=False):
            return None
        own = exc is not None and not is_collective_error(exc)
        self._state, self._error = (ERROR, describe(exc)) if own else (FAILED, "")
        if self.folder is not None:
            self._beat()
        if own:
            verdict = own_verdict(self.me, self.step, exc)
        elif silent is not None:
            verdict = diagnose(self.me, self.step, beats or {}, silent, self.infos)
        elif not self.watching:  # no heartbeats to read: the collective's own words are all there is
            verdict = Verdict("collective", f"a collective failed after step {self.step}: {describe(exc)} (the other "
                                            f"ranks' heartbeats are not readable here: no rank can be named)",
                              error=describe(exc), step=self.step, reporter=self.me.rank)
        else:
            verdict = self._observe(describe(exc) if exc is not None else "")
        if self._claim(verdict):
            self.claimed = verdict
            if not own:  # an exception of this rank's own is said by whoever catches it
                log.error("%s", verdict.message)
            self.on_failure(verdict)
        return verdict

    def _observe(self, collective: str) -> Verdict:
        """Watch the others' heartbeats for three beats: who is silent, who raised? (a verdict already
        claimed by another rank is taken as it is)."""
        start = time.monotonic()
        first = self._read_peers()
        seen = {r: (b.seq if b else None) for r, b in first.items()}
        moved: set[int] = set()
        beats = first
        while time.monotonic() - start < 3 * self.interval:
            claimed = read_verdict(self.folder) if self.folder is not None else None
            if claimed is not None:
                return claimed
            time.sleep(self.interval / 2)
            beats = self._read_peers()
            moved |= {r for r, b in beats.items() if b is not None and b.seq != seen[r]}
            if any(b is not None and b.state == ERROR for b in beats.values()):
                break
        waited = time.monotonic() - start
        silent = {r: waited for r, b in beats.items() if r not in moved and (b is None or b.state == RUNNING)}
        return diagnose(self.me, self.step, beats, silent, self.infos, collective)

    def _claim(self, verdict: Verdict) -> bool:
        """Publish `verdict` as the session's unless another rank already did (an atomic link, NFS included)."""
        if self.folder is None:
            return True
        tmp = self.folder / f".{VERDICT}.{self.me.rank}"
        tmp.write_text(json.dumps(verdict.to_dict(), indent=1) + "\n")
        try:
            os.link(tmp, self.folder / VERDICT)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a file system without hard links: first writer wins, less strictly
            log.warning("cannot link %s (%s); claiming by exclusive create", self.folder / VERDICT, e)
            try:
                with open(self.folder / VERDICT, "x") as f:
                    f.write(tmp.read_text())
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- beats and watching
    def _beat(self) -> None:
        with self._writing:
            self._seq += 1
            beat = Beat(self.me.rank, self.me.node, self.me.host, self.me.pid, self.step, self._seq, self._state,
                        self._error, self.folder.name)
            path = self.folder / f"rank-{self.me.rank}.json"
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_text(json.dumps(asdict(beat)))
                tmp.replace(path)  # readers see the old beat or the new one, never half of one
            except OSError as e:  # a full or hanging file system: the next beat tries again
                log.warning("heartbeat %s not written: %s", path, e)

    def _read_peers(self) -> dict[int, Beat | None]:
        """Every other rank's last heartbeat of this session (None: missing, torn or another session's)."""
        beats: dict[int, Beat | None] = {}
        for rank in self.infos:
            if rank == self.me.rank:
                continue
            try:
                beat = Beat(**json.loads((self.folder / f"rank-{rank}.json").read_text()))
            except (OSError, ValueError, TypeError):
                beat = None
            beats[rank] = beat if beat is not None and beat.session == self.folder.name else None
        return beats

    def _watch(self) -> None:
        """The thread: beat; while the loop stalls, read the others and name those silent for too long."""
        last_change: dict[int, tuple[int | None, float]] = {}
        previous = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - previous > 3 * self.interval:  # this process was stopped or starved: others' silence is no news
                last_change.clear()
            previous = now
            self._beat()
            if self._failing.locked():  # the main thread is handling a failure: keep beating, it needs the others' beats
                continue
            if now - self._progress < 2 * self.interval or not self.watching:
                last_change.clear()
                continue
            if self.folder is not None and (self.folder / VERDICT).exists() and self._state == RUNNING:
                self._leave_for(read_verdict(self.folder))
            beats = self._read_peers()
            for rank, beat in beats.items():
                seq = beat.seq if beat is not None else None
                if rank not in last_change or last_change[rank][0] != seq:
                    last_change[rank] = (seq, now)
            silent = {r: now - t for r, (_, t) in last_change.items()
                      if now - t >= self.silence_s and (beats[r] is None or beats[r].state == RUNNING)}
            if silent and self.fail(None, silent, beats) is not None:
                self._exit()

    def _leave_for(self, verdict: Verdict | None) -> None:
        """Another rank named the failure while this rank's loop waits in a collective: leave now."""
        if not self._failing.acquire(blocking=False):
            return
        self._state = FAILED
        self._beat()
        log.warning("leaving: %s", verdict.message if verdict else "another rank named a failure")
        self._exit()

    def _exit(self) -> None:
        """End the process from the thread: its main thread is blocked in a collective and cannot be woken."""
        logging.shutdown()
        os._exit(1)


def prune_sessions(health_dir: Path, keep: str) -> None:
    """Remove earlier sessions' folders that hold no verdict (runs that ended normally or were requeued)."""
    for folder in health_dir.iterdir():
        if folder.is_dir() and folder.name != keep and not (folder / VERDICT).exists():
            shutil.rmtree(folder, ignore_errors=True)

