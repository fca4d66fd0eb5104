"""Virtual ranks: a run's recipe, fixed when it starts, whatever number of processes trains it.

A run fixes at its start its number of virtual ranks V (`train.virtual_ranks`; null: V = `train.global_batch`
/ `train.batch_size` when that is given, else the starting world size) and so its global batch, V x
`train.batch_size`. Each virtual rank keeps its batch of `train.batch_size` (batch norm sees the same
batches) and its slice of every epoch's sample order (`pipeline.sampling`: virtual rank v takes the
global positions v, v + V, ...). W processes, W dividing V, share them out: process r hosts the h = V / W
consecutive virtual ranks r*h .. r*h + h - 1, one micro-batch each per step, and the step's gradient is
the mean over all V of them (`training.accumulate`). Process 0 thus hosts virtual rank 0, whose batch norm
running statistics checkpoints and evaluation use, as rank 0's are in a run of V processes.

The checkpoint records V and the global batch (`virtual_ranks`, `global_batch`: optional keys of format 2),
and so does the run's resolved config: a resumed run keeps them on any W that divides V, and a world
size that does not is one line naming the sizes that work. A checkpoint written before virtual ranks
existed started with V = its world size. `train.global_batch` on its own is gradient accumulation (a
big batch on few GPUs): the same mechanism, V = global batch / batch size from the first start.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from training.config import Config, ConfigError


def working_sizes(virtual_ranks: int) -> list[int]:
    """The process counts that can host `virtual_ranks`: its divisors."""
    return [n for n in range(1, virtual_ranks + 1) if virtual_ranks % n == 0]


def say_sizes(sizes: list[int]) -> str:
    """'1, 2 or 4' (or '1')."""
    words = [str(n) for n in sizes]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@dataclass(frozen=True)
class VirtualRanks:
    """A run's virtual ranks and this process's share of them.

    Args:
        total: the run's virtual ranks V.
        world_size: processes W now training it (W divides V).
        rank: this process.
        batch_size: each virtual rank's batch (`train.batch_size`).

    Raises:
        ConfigError: W does not divide V (one line naming the process counts that work).
    """

    total: int
    world_size: int
    rank: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.total < 1 or self.total % self.world_size:
            raise ConfigError(f"{self.world_size} processes cannot host this run's {self.total} virtual ranks "
                              f"(train.virtual_ranks, fixed when the run started; global batch {self.global_batch}): "
                              f"the process count must divide it; use {say_sizes(working_sizes(self.total))} "
                              f"processes (nodes x tasks per node, or --nproc)")

    @property
    def hosted(self) -> int:
        """Virtual ranks this process hosts: micro-batches per step."""
        return self.total // self.world_size

    @property
    def first(self) -> int:
        """The first virtual rank this process hosts (the others follow it)."""
        return self.rank * self.hosted

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all virtual ranks."""
        return self.total * self.batch_size

    def describe(self) -> str:
        """'4 virtual ranks on 2 processes (2 each)', or '2 ranks' when each process is one."""
        if self.hosted == 1:
            return f"{self.total} rank{'s' * (self.total > 1)}"
        return f"{self.total} virtual ranks on {self.world_size} process{'es' * (self.world_size > 1)} " \
               f"({self.hosted} each)"


def configured(cfg: Config) -> int | None:
    """The virtual ranks the config asks for (`train.virtual_ranks`, or `train.global_batch` / `train.batch_size`);
    None leaves them to the starting world size."""
    t = cfg.train
    if t.virtual_ranks is not None:
        return t.virtual_ranks
    if t.global_batch is not None:
        return t.global_batch // t.batch_size  # a multiple: training.config checks it
    return None


def at_start(cfg: Config, world_size: int, rank: int) -> VirtualRanks:
    """The virtual ranks of a run starting now on `world_size` processes (a resume may still change them to its
    checkpoint's: `on_resume`).

    Raises:
        ConfigError: the world size does not divide the virtual ranks the config asks for.
    """
    return VirtualRanks(configured(cfg) or world_size, world_size, rank, cfg.train.batch_size)


def started_with(ckpt: dict[str, Any]) -> int:
    """The virtual ranks the run of a checkpoint started with (a checkpoint older than virtual ranks: its world
    size, or its sampler's shard count)."""
    if ckpt.get("virtual_ranks"):
        return int(ckpt["virtual_ranks"])
    if ckpt.get("world_size"):
        return int(ckpt["world_size"])
    return int(ckpt.get("loader", {}).get("sampler", {}).get("num_replicas", 1))


def on_resume(cfg: Config, ckpt: dict[str, Any], where: str, world_size: int, rank: int) -> VirtualRanks:
    """The virtual ranks a resumed run keeps: its checkpoint's, on this world size.

    Raises:
        ConfigError: the config asks for other virtual ranks, another global batch or another per-rank batch
            than the run started with, or the world size does not divide its virtual ranks.
    """
    total = started_with(ckpt)
    started = ckpt.get("config", {}).get("train", {})
    batch = int(started.get("batch_size") or ckpt.get("loader", {}).get("batch_size") or cfg.train.batch_size)
    fix = "a run keeps its recipe on any number of processes; drop the setting, or start a new run (--resume none)"
    if cfg.train.batch_size != batch:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} but {where} was written by a run of {batch} per "
                          f"virtual rank ({total} virtual ranks, global batch {total * batch}); {fix}")
    asked = configured(cfg)
    if asked is not None and asked != total:
        key = "train.virtual_ranks" if cfg.train.virtual_ranks is not None else "train.global_batch"
        value = cfg.train.virtual_ranks if cfg.train.virtual_ranks is not None else cfg.train.global_batch
        raise ConfigError(f"{key} = {value} but {where} was written by a run of {total} virtual ranks (global batch "
                          f"{total * batch}); {fix}")
    return VirtualRanks(total, world_size, rank, batch)


def resolved(cfg: Config, virtual: VirtualRanks) -> Config:
    """The config with the run's virtual ranks and global batch written out (the run folder's config.yaml, and
    every checkpoint's)."""
    return replace(cfg, train=replace(cfg.train, virtual_ranks=virtual.total, global_batch=virtual.global_batch))
