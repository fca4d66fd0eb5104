"""Local multi-process launch: N ranks of a `senet` command on this machine, like torchrun.

Each rank is a fresh interpreter with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), so DALI can start its Python workers
before anything touches CUDA. When one rank fails the others are stopped and the first failure's
status is returned: a rank that is stopped (SIGSTOP) is killed at once, since it heeds no SIGTERM, and
the others get a grace period to notice and name the failure (`training.health`); SIGTERM to the
launcher is passed on to every rank, and whatever a killed rank leaves behind (its DALI workers, adopted
by the launcher) is ended once the ranks are gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.processes import become_subreaper, child_pids, kill_children


def launch_ranks(command: Sequence[str], nproc: int, extra_env: Mapping[str, str] | None = None) -> int:
    """Run `command` as ranks 0..nproc-1 on this machine; returns the first failure's status, else 0."""
    from training.ranks import DistInfo, free_port

    port = free_port()
    become_subreaper()  # a SIGKILLed rank's DALI workers are adopted by us, not by init
    before = child_pids()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        info = DistInfo(rank=rank, local_rank=rank, world_size=nproc, local_world_size=nproc, master_port=port)
        procs.append(subprocess.Popen(list(command), env={**os.environ, **info.env(), **(extra_env or {})}))
    forward = lambda signum, _frame: [p.send_signal(signum) for p in procs if p.poll() is None]  # noqa: E731
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return wait_all(procs)
    except KeyboardInterrupt:
        stop_all(procs, grace_s=5.0)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        kill_children(sorted(child_pids() - before))  # whatever the ranks left behind, once they are gone


def wait_all(procs: list[subprocess.Popen], grace_s: float = 15.0) -> int:
    """Wait for every rank; when one fails, kill the stopped ones and give the others `grace_s` to notice.

    Returns the first failure's exit status (signals as 128 + number), else 0.
    """
    first_failure = 0
    deadline = None
    while any(p.poll() is None for p in procs):
        for p in procs:
            code = p.poll()
            if code not in (None, 0) and not first_failure:
                first_failure = code if code > 0 else 128 - code
                deadline = time.monotonic() + grace_s
        if first_failure:
            for p in procs:
                if p.poll() is None and stopped(p.pid):
                    p.kill()
        if deadline is not None and time.monotonic() > deadline:
            stop_all(procs, grace_s=5.0)
            break
        time.sleep(0.1)
    for p in procs:
        code = p.wait()
        if code and not first_failure:
            first_failure = code if code > 0 else 128 - code
    return first_failure


def stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the ranks still running, then SIGKILL those that outlive `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, or a debugger): state T or t in /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] in "Tt"  # the command name in parentheses may hold spaces
