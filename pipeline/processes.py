"""Process hygiene for everything that starts processes: how they start, which signals they heed, how
they end, and that none outlives its parent (Linux).

- Start method: DALI forks its Python workers, which is unsafe once this process has initialised the
  CUDA driver, and DALI then refuses to fork (its `_multiproc` pool asks the driver itself). Note that
  `torch.cuda.is_available()` initialises the driver while `torch.cuda.is_initialized()` stays False,
  so only DALI's own check (`nvidia.dali.backend.IsDriverInitialized()`) tells the truth: `start_method`
  asks it, and spawns when the driver is up.
- Signals: inside a Slurm job every task receives SIGTERM before a requeue or a time limit, and the
  job must keep running until its checkpoint; workers started inside `worker_signal_policy` ignore it.
  A worker ignores SIGINT: Ctrl-C signals the whole foreground process group, and a worker interrupted
  inside DALI's shared queue dies between a lock's acquire and release (its cleanup then fails with
  "lock is not owned"), which could leave the owner's close waiting on that lock. The owner takes
  the KeyboardInterrupt and closes its workers.
- Ends: a worker arms PR_SET_PDEATHSIG (`become_worker_of`) as it is forked (`workers_die_with_owner`; a
  spawned one at its first batch), so it dies with the process that owns it, even one that never ran a
  batch (a val loader's, before the first evaluation) when its owner leaves without closing it;
  `DaliProcesses.close` kills stragglers after a grace period; a launcher that starts ranks becomes a
  child subreaper (`become_subreaper`) and ends whatever a killed rank left behind (`kill_children`);
  a command that ran out of time is ended with everything it started (`kill_tree`).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

WORKER_EXIT_GRACE_S = 5.0  # after close(), workers still alive this long are killed
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36  # prctl(2) options


def start_method() -> str:
    """'fork' (cheap) unless this process has initialised the CUDA driver; then 'spawn'."""
    from nvidia.dali import backend

    return "spawn" if backend.IsDriverInitialized() else "fork"


def child_pids() -> set[int]:
    """Pids of this process's children (all threads' children, from /proc)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards: state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def kill_children(pids: list[int] | None = None) -> None:
    """SIGKILL and reap `pids` (default: every child) that are still this process's children.

    A pid that is no longer our child (reaped, then reused by the system) is left alone.
    """
    for pid in sorted(child_pids() if pids is None else pids):
        stat = proc_stat(pid)
        if stat is None or int(stat[1]) != os.getpid():
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (its children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(entry.name)
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants, all found before any is killed (a killed process's children
    are re-parented at once and would drop out of the tree)."""
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            os.kill(member, signal.SIGKILL)


def become_subreaper() -> None:
    """Adopt what our children leave behind (a SIGKILLed rank's DALI workers survive it), so we can end it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_ARMED_PID = 0


def become_worker_of(owner_pid: int) -> None:
    """In a worker process: ask Linux to kill it when the owner dies, and leave Ctrl-C to the owner.
    A no-op in the owner itself."""
    global _ARMED_PID
    pid = os.getpid()
    if pid == owner_pid or pid == _ARMED_PID:
        return
    _ARMED_PID = pid
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    with contextlib.suppress(ValueError):  # only possible in the main thread (a fork's child runs in it)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != owner_pid:  # the owner died before the signal was armed
        os._exit(1)


_FORK_OWNER = 0  # while workers are forked (`workers_die_with_owner`): the pid they must die with


def _arm_forked_worker() -> None:
    """In every child forked by this process (os.register_at_fork): arm the death signal if it is a worker."""
    global _FORK_OWNER
    owner, _FORK_OWNER = _FORK_OWNER, 0  # the worker's own children, if any, are not ours to arm
    if owner:
        become_worker_of(owner)


os.register_at_fork(after_in_child=_arm_forked_worker)


@contextlib.contextmanager
def workers_die_with_owner() -> Iterator[None]:
    """Processes forked inside this block arm PR_SET_PDEATHSIG at once, before they run anything: a worker that
    waits for its first task would otherwise outlive an owner that leaves without closing it (os._exit after a
    failed rank, SIGKILL). The death signal follows the forking thread: fork from the thread that keeps the
    pipeline (the main one)."""
    global _FORK_OWNER
    _FORK_OWNER = os.getpid()
    try:
        yield
    finally:
        _FORK_OWNER = 0


@contextlib.contextmanager
def worker_signal_policy() -> Iterator[None]:
    """Workers forked or spawned inside this block inherit SIGTERM ignored when inside a Slurm job, and
    spawned ones SIGINT ignored (a forked one ignores it from its first instruction, `become_worker_of`;
    a spawned one only from its first batch, so it must inherit it: this process ignores Ctrl-C while
    spawning them)."""
    ignored = [signal.SIGTERM] if "SLURM_JOB_ID" in os.environ else []
    if start_method() == "spawn":
        ignored.append(signal.SIGINT)
    if not ignored or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}  # SIG_IGN survives fork and exec
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class DaliProcesses:
    """One DALI pipeline and its Python workers: started with the signal policy, closed without orphans.

    The workers start here, before the pipeline is built (building a GPU pipeline initialises the
    CUDA driver, after which they could only be spawned).
    """

    def __init__(self, pipe: Any, py_workers: int) -> None:
        self.pipe = pipe
        before = child_pids()
        if py_workers:
            with worker_signal_policy(), workers_die_with_owner():
                pipe.start_py_workers()
        self.worker_pids = sorted(child_pids() - before)
        self.built = False

    def run(self) -> Any:
        if not self.built:
            self.pipe.build()
            self.built = True
        return self.pipe.run()

    def reset(self) -> None:
        self.pipe.reset()

    def close(self) -> None:
        """Shut the pipeline and its workers down now; kill any worker still alive after a grace period.

        DALI stops its workers only when the pipeline object is garbage-collected. Any lingering
        reference (a caller's local variable) would keep them running until the kill below, and
        DALI's own close, run later by the collector, would then wait forever on the dead worker.
        So the pipeline's executor and worker pool are closed here, explicitly (both idempotent).
        """
        pids, self.worker_pids = self.worker_pids, []
        pipe, self.pipe = self.pipe, None
        killer = threading.Timer(WORKER_EXIT_GRACE_S, kill_children, args=(pids,))
        killer.daemon = True
        killer.start()  # DALI joins its workers after a gentle stop; a worker ignoring SIGTERM could hang that
        if pipe is not None:
            pipe._shutdown()  # no public close in DALI 2.4: the executor first,
            pool = getattr(pipe, "_py_pool", None)
            if pool is not None:
                pool.close()  # then the Python workers (stopped, joined)
        del pipe
        gc.collect()
        killer.cancel()
        kill_children(pids)
