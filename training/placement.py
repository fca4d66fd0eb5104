"""Where a process runs, decided once: `Placement`, built from the environment and the config.

Every entry point builds one (`senet train`, torchrun, a Slurm task, `senet predict`, `bench-input`,
`bench-train`) and hands it down; nothing below re-derives a device, a GPU index, a backend or a
thread count. `pipeline` and `models` never see it: they get its plain values (device, device_id,
threads, py_workers).

The rules:

- GPU index: ``LOCAL_RANK mod (visible GPUs)``, so all of a node's GPUs visible to every task, one
  per task, or a few per task all work. Counting GPUs goes through NVML and never initialises the
  CUDA driver (DALI cannot fork its workers after that). Two ranks on one physical GPU are refused
  when the process group starts (`training.dist.check_distinct_gpus`, by GPU UUID).
- CPU share: the cores of this process's affinity mask, divided by the local ranks bound to the same
  mask: LOCAL_WORLD_SIZE when the mask is every core the host's control group (cgroup cpuset) allows,
  else the local ranks in proportion to the mask (per-task binding: 1; binding to a socket of two:
  half of them); then capped by the cgroup's CPU quota (a container's `--cpus`) shared by the local
  ranks, and by SLURM_CPUS_PER_TASK.
- DALI threads: `data.threads`, or the CPU share less the Python workers; torch threads:
  `train.torch_threads`, or the share.
- Backend: nccl on 'gpu', gloo on 'cpu'; host-side agreements (checkpoint requests, metrics) always
  on a gloo group, so that they never synchronise a GPU stream.
- Precision: `train.precision` resolved for the device (auto = bf16 on GPU, fp32 on CPU).

`check_node` then checks what the input needs from the node (shared memory for DALI's Python workers,
the locked-memory limit for pinned buffers) and says in one line what to change.
"""
from __future__ import annotations

import logging
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from training.config import Config, ConfigError
from training.ranks import DistInfo
from training.precision import Precision, resolve_precision

log = logging.getLogger("senet.placement")

BACKENDS = {"gpu": "nccl", "cpu": "gloo"}
CONTROL_BACKEND = "gloo"


class PlacementError(ConfigError):
    """This process cannot run as configured on this node; the message names the fix (exit 2)."""


def gpu_count() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES honoured), counted through NVML.

    Unlike `torch.cuda.is_available()`, this does not initialise the CUDA driver: safe before DALI
    forks its workers, and in pytest skip conditions.
    """
    return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0


@dataclass(frozen=True)
class HostCpus:
    """What the host lets this process use: its affinity mask, the cgroup's cpuset and CPU quota."""

    affinity: int  # cores in this process's affinity mask
    allowed: int  # cores the process's control group allows (its cpuset), else the host's cores
    quota: float | None = None  # the control group's CPU quota in cores (cpu.max), None when unlimited

    @classmethod
    def read(cls) -> HostCpus:
        """This process's view, from sched_getaffinity and /sys/fs/cgroup (v2, else v1)."""
        affinity = len(os.sched_getaffinity(0))
        allowed = _cgroup_cpuset() or os.cpu_count() or affinity
        return cls(affinity=affinity, allowed=max(allowed, affinity), quota=_cgroup_quota())


def cpu_share(cpus: HostCpus, local_world_size: int, slurm_cpus_per_task: int | None) -> tuple[int, str]:
    """This rank's cores (>= 1) and how they were derived (see the module docstring)."""
    if cpus.affinity < cpus.allowed:  # bound: the ranks sharing this mask, in proportion
        sharing = min(local_world_size, max(1, round(local_world_size * cpus.affinity / cpus.allowed)))
        how = f"{cpus.affinity} cores bound to {sharing} local rank(s)"
    else:
        sharing = local_world_size
        how = f"{cpus.affinity} cores shared by {sharing} local rank(s)"
    share = max(1, cpus.affinity // sharing)
    if cpus.quota is not None and cpus.quota / local_world_size < share:
        share = max(1, math.floor(cpus.quota / local_world_size))
        how += f", cgroup quota {cpus.quota:g} cores"
    if slurm_cpus_per_task and slurm_cpus_per_task < share:
        share = slurm_cpus_per_task
        how += f", SLURM_CPUS_PER_TASK={slurm_cpus_per_task}"
    return share, how


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its place in the job, its device, its CPU share and its precision."""

    dist: DistInfo
    device: str  # "gpu" or "cpu"
    gpu_index: int | None  # CUDA ordinal among the visible GPUs; None on the CPU
    backend: str  # process group backend: "nccl" or "gloo"
    cpus: int  # this rank's CPU share
    cpu_rule: str  # how the share was derived, for the log
    dali_threads: int
    py_workers: int
    torch_threads: int
    precision: Precision

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def control_backend(self) -> str:
        """Host-side agreements: always a CPU group, never a GPU stream."""
        return CONTROL_BACKEND

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.gpu_index) if self.device == "gpu" else torch.device("cpu")

    def describe(self) -> str:
        """One line for the log."""
        where = f"cuda:{self.gpu_index}" if self.device == "gpu" else "cpu"
        return (f"rank {self.dist.rank}/{self.dist.world_size} (local {self.dist.local_rank}/"
                f"{self.dist.local_world_size}) on {where}, {self.backend}, {self.precision.name}; {self.cpus} CPU(s) "
                f"({self.cpu_rule}): {self.dali_threads} DALI thread(s), {self.py_workers} Python worker(s), "
                f"{self.torch_threads} torch thread(s)")


def place(device: str, *, precision: str = "auto", threads: int | None = None, py_workers: int = 0,
          torch_threads: int | None = None, dist: DistInfo | None = None, env: Mapping[str, str] | None = None,
          cpus: HostCpus | None = None, gpus: int | None = None) -> Placement:
    """The placement of this process for `device` ('gpu' or 'cpu').

    Args:
        device: 'gpu' or 'cpu'.
        precision: 'auto', 'fp32', 'bf16' or 'fp16'.
        threads: DALI threads; None = the CPU share less the Python workers.
        py_workers: DALI's Python worker processes.
        torch_threads: torch's intra-op threads; None = the CPU share.
        dist: the rank facts; default read from `env`.
        env: the environment (default os.environ); cpus, gpus: the host's (default: read here).

    Raises:
        PlacementError: 'gpu' without a visible GPU.
        ConfigError: an unknown device or precision.
    """
    env = os.environ if env is None else env
    if device not in BACKENDS:
        raise ConfigError(f"device {device!r} is not one of 'gpu', 'cpu'")
    dist = dist or DistInfo.from_env(dict(env))
    cpus = cpus or HostCpus.read()
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    share, rule = cpu_share(cpus, dist.local_world_size, int(slurm) if slurm.isdigit() else None)
    gpu_index = None
    if device == "gpu":
        gpus = gpu_count() if gpus is None else gpus
        if gpus < 1:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            raise PlacementError("train.device = 'gpu' but this process sees no CUDA device"
                                 + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                                 + "; run on a GPU node, or set train.device=cpu (--device cpu)")
        gpu_index = dist.local_rank % gpus
    try:
        prec = resolve_precision(precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Placement(dist=dist, device=device, gpu_index=gpu_index, backend=BACKENDS[device], cpus=share,
                     cpu_rule=rule, dali_threads=threads or max(1, share - py_workers), py_workers=py_workers,
                     torch_threads=torch_threads or share, precision=prec)


def place_run(cfg: Config, dist: DistInfo | None = None, env: Mapping[str, str] | None = None,
              cpus: HostCpus | None = None, gpus: int | None = None) -> Placement:
    """The placement of a training rank: `train.device`, `train.precision`, `train.torch_threads`, `data.threads`,
    `data.py_workers`."""
    return place(cfg.train.device, precision=cfg.train.precision, threads=cfg.data.threads,
                 py_workers=cfg.data.py_workers, torch_threads=cfg.train.torch_threads, dist=dist, env=env, cpus=cpus,
                 gpus=gpus)


# ------------------------------------------------------------------------------------ node checks
SHM = "/dev/shm"
SHM_HEADROOM = 2.0  # DALI grows a shared-memory chunk when a batch does not fit; big files vary


def input_shm_bytes(p: Placement, batch_size: int, sample_bytes: float, prefetch: int, pipelines: int = 2) -> int:
    """Shared memory the node's DALI Python workers may hold: every local rank's pipelines, each with the
    batches its source computes ahead plus those DALI keeps alive, times the bytes of a batch."""
    if p.py_workers == 0:
        return 0
    batches_in_flight = max(prefetch, p.py_workers) + prefetch + 1
    return int(p.dist.local_world_size * pipelines * batches_in_flight * batch_size * sample_bytes * SHM_HEADROOM)


def check_node(p: Placement, *, shm_needed: int, pinned_needed: int, shm: str = SHM,
               memlock: int | None = None) -> None:
    """Refuse to start when the node cannot feed the input; warn about a low locked-memory limit.

    Args:
        shm_needed: bytes of shared memory DALI's Python workers need on this node (`input_shm_bytes`).
        pinned_needed: bytes of pinned host memory this rank's decoders preallocate.
        shm: the shared-memory mount; memlock: RLIMIT_MEMLOCK's soft limit (default: read here).

    Raises:
        PlacementError: too little free shared memory (a container's 64 MB default kills DALI's workers).
    """
    if shm_needed:
        try:
            stat = os.statvfs(shm)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = 0
        if free < shm_needed:
            raise PlacementError(
                f"{shm} has {free / 2**20:,.0f} MiB free but DALI's Python workers of {p.dist.local_world_size} local "
                f"rank(s) need about {shm_needed / 2**20:,.0f} MiB; give the node more shared memory (docker run "
                f"--shm-size=16g; Kubernetes: an emptyDir with medium: Memory at {shm}) or lower data.py_workers, "
                f"data.prefetch or train.batch_size")
    if p.device != "gpu" or not pinned_needed:
        return
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] if memlock is None else memlock
    if limit != resource.RLIM_INFINITY and limit < pinned_needed and p.is_main:
        # The CUDA driver pins memory without this limit, but RDMA (NCCL over InfiniBand, GPUDirect)
        # registers memory against it: a low limit fails later, far from its cause.
        log.warning("the locked-memory limit (ulimit -l) is %d KiB, below the %d MiB of pinned buffers per rank; "
                    "NCCL over InfiniBand needs it raised: `ulimit -l unlimited` in the job, or Slurm's "
                    "PropagateResourceLimits / the node's limits.conf", limit // 1024, pinned_needed // 2**20)


def mean_file_bytes(root: Path, files: list[str] | tuple[str, ...], sample: int = 256) -> float:
    """The mean size of up to `sample` of the files (evenly spread), for the shared-memory estimate."""
    if not files:
        return 0.0
    step = max(1, len(files) // sample)
    sizes = []
    for name in files[::step][:sample]:
        try:
            sizes.append(os.path.getsize(Path(root) / name))
        except OSError:
            continue
    return float(sum(sizes) / len(sizes)) if sizes else 0.0


# ------------------------------------------------------------------------------------ cgroups
def _cgroup_dirs() -> list[Path]:
    """This process's cgroup folders: the v2 unified one, or the v1 cpuset and cpu controllers'."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            dirs.append(Path("/sys/fs/cgroup") / path.lstrip("/"))
        for name in ("cpuset", "cpu"):
            if name in controllers.split(","):
                dirs.append(Path("/sys/fs/cgroup") / controllers / path.lstrip("/"))
    return dirs


def _parse_cpu_list(text: str) -> int:
    """Cores in a list such as '0-7,16-23'."""
    count = 0
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            count += int(hi) - int(lo) + 1
        elif part:
            count += 1
    return count


def _cgroup_cpuset() -> int | None:
    for folder in _cgroup_dirs():
        for name in ("cpuset.cpus.effective", "cpuset.effective_cpus"):
            try:
                return _parse_cpu_list((folder / name).read_text()) or None
            except (OSError, ValueError):
                continue
    return None


def _cgroup_quota() -> float | None:
    for folder in _cgroup_dirs():
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "400000 100000"
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota < 0 else quota / period
        except (OSError, ValueError):
            continue
    return None
