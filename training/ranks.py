"""Where a process sits in the job: `DistInfo`, read once from the environment that launched it.

torchrun and `senet train --nproc` set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; a Slurm task has SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (submitit's
`TorchDistributedEnvironment().export()` sets the torchrun names too). Nothing here knows about Slurm
beyond those variable names. `DistInfo` is the rank facts of `training.placement.Placement`.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0  # device index for torch *and* DALI
    world_size: int = 1
    local_world_size: int = 1  # processes on this node (sets each rank's CPU share)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1} (world size {self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside 0..{self.local_world_size - 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistInfo:
        """Read torchrun-style variables, else Slurm task variables, else a single process.

        Raises:
            ValueError: a variable that is not an integer, or an inconsistent rank.
        """
        env = dict(os.environ if env is None else env)

        def first(*names: str, default: str) -> str:
            return next((env[n] for n in names if env.get(n, "") != ""), default)

        def integer(*names: str, default: int) -> int:
            text = first(*names, default=str(default))
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"environment variable {names[0]}={text!r} is not an integer") from None

        world = integer("WORLD_SIZE", "SLURM_NTASKS", default=1)
        local_world = integer("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
        return cls(rank=integer("RANK", "SLURM_PROCID", default=0), local_rank=integer("LOCAL_RANK", "SLURM_LOCALID", default=0),
                   world_size=world, local_world_size=min(local_world, world),
                   master_addr=first("MASTER_ADDR", default="127.0.0.1"), master_port=integer("MASTER_PORT", default=29500))

    def env(self) -> dict[str, str]:
        """The torchrun variables describing this process (for launching it)."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def free_port() -> int:
    """A TCP port on this host that nobody listens on right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
