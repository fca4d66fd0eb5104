"""torch.distributed set up and torn down around a run, and the few collectives the loop uses.

The rank facts come from `training.ranks.DistInfo` inside this process's `training.placement.Placement`.

A rank that dies or hangs must not hang the others forever. `training.health` names it first: its
heartbeat stops, and after `train.dist_timeout_s` of silence the others stop, naming it. The collectives'
own timeout is a backstop a little later (`process_group_timeout`): gloo then raises, NCCL's watchdog
(asynchronous error handling, which torch enables by default and which we set explicitly) aborts the
process. A dead peer's closed connection makes gloo raise at once.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as tdist

from training.placement import Placement, PlacementError

BACKSTOP_S = 15.0  # the collectives time out this much after the heartbeats name a silent rank (plus their checks)


def process_group_timeout(dist_timeout_s: float, heartbeat_s: float) -> float:
    """The collectives' own timeout: long enough for the heartbeat watchdog to name a silent rank first.

    The watchdog notices a stall after two heartbeats, names a rank silent for `dist_timeout_s`, and
    needs a few seconds to act on it (see `training.health`); NCCL's watchdog would abort the process
    without a word if it came first.
    """
    return dist_timeout_s + 5 * heartbeat_s + BACKSTOP_S


def init_distributed(p: Placement, timeout_s: float) -> bool:
    """Select this rank's GPU, then join the process group (`env://` rendezvous) unless this is a single process.

    Call it after the loaders have started their workers: selecting the GPU initialises the CUDA
    driver. NCCL's communicators are created at the first collective on the GPU (DDP's first
    broadcast), so `check_distinct_gpus` can refuse a shared GPU before NCCL ever sees it.

    Args:
        p: this process's placement (rank facts, device, backend).
        timeout_s: how long any collective may wait for another rank before it raises
            (`process_group_timeout`).

    Returns:
        True when this call created the process group (the caller then tears it down).
    """
    if p.device == "gpu":
        torch.cuda.set_device(p.gpu_index)
    dist = p.dist
    if not dist.distributed or tdist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", dist.master_addr)
    os.environ.setdefault("MASTER_PORT", str(dist.master_port))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL collective aborts the process
    tdist.init_process_group(p.backend, rank=dist.rank, world_size=dist.world_size,
                             timeout=datetime.timedelta(seconds=timeout_s))
    return True


def check_distinct_gpus(p: Placement, group: tdist.ProcessGroup | None) -> None:
    """Every rank on its own physical GPU (compared by UUID on the host group), or one clear error on every rank.

    Raises:
        PlacementError: naming the ranks that share a GPU and the fix.
    """
    if p.device != "gpu" or not tdist.is_initialized():
        return
    mine = (p.dist.rank, socket.gethostname(), str(torch.cuda.get_device_properties(p.gpu_index).uuid), p.gpu_index)
    everyone: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, mine, group=group)
    problem = shared_gpu(everyone)
    if problem:
        raise PlacementError(problem)


def shared_gpu(ranks: list[tuple[int, str, str, int]]) -> str | None:
    """The first GPU used by two ranks, as an error message; None when every rank has its own.

    Args:
        ranks: (rank, host, GPU UUID, CUDA ordinal) of every rank.
    """
    owner: dict[str, tuple[int, str, str, int]] = {}
    for rank, host, uuid, index in ranks:
        if uuid in owner:
            first = owner[uuid]
            return (f"ranks {first[0]} and {rank} on {host} both use GPU {uuid} (cuda:{first[3]} and cuda:{index}): "
                    f"one GPU per rank; start at most as many local ranks as GPUs (--nproc, --ntasks-per-node, "
                    f"slurm.gpus_per_node), each task seeing its own GPU or all of them")
        owner[uuid] = (rank, host, uuid, index)
    return None


def control_group(backend: str, timeout_s: float) -> tdist.ProcessGroup | None:
    """A CPU (gloo) group for small host-side agreements, so that they never synchronise a GPU stream.

    It times out like the world group (`new_group` would otherwise take torch's 30-minute default).
    """
    if not tdist.is_initialized():
        return None
    if backend != "nccl":
        return None  # the world group, already gloo
    return tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def teardown_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: tdist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce (sum, max or min); a no-op in a single process."""
    if tdist.is_initialized():
        tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op],
                         group=group)
    return tensor


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BN running statistics) to every rank; a no-op in a single process."""
    if tdist.is_initialized():
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=src)


def barrier(group: tdist.ProcessGroup | None = None) -> None:
    if tdist.is_initialized():
        tdist.barrier(group=group)
