"""A step's gradient over virtual ranks hosted by real gloo processes (training.accumulate), against the mean of
each virtual rank's gradient computed on its own.

Two processes host two virtual ranks each (V = 4), behind DDP with small buckets (several per step): the
exact reduction gives, bit for bit, (g0 + g1 + g2 + g3) / 4 added in virtual-rank order, the summed one
(the GPU's: accumulation, then one all-reduce) the same mean to rounding; each process keeps its first
hosted virtual rank's batch norm statistics.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.helpers import BATCH, IN_MEMORY, small_model, tensors
from training.accumulate import VirtualGradients
from training.config import load_config
from training.virtual import VirtualRanks

VIRTUAL, WORLD = 4, 2


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return small_model(load_config(None, IN_MEMORY)).train(), *tensors(VIRTUAL * BATCH, 9)


def micro_batch(images: torch.Tensor, labels: torch.Tensor, virtual_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = slice(virtual_rank * BATCH, (virtual_rank + 1) * BATCH)
    return images[rows], labels[rows]


def process(rank: int, exact: bool, store: str, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model, images, labels = model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, broadcast_buffers=False,
                                                  bucket_cap_mb=0.0005)  # a few parameters per bucket
        virtual = VirtualRanks(VIRTUAL, WORLD, rank, BATCH)
        gradients = VirtualGradients(model, ddp, virtual, exact)
        ddp.register_comm_hook(None, gradients.hook)
        for step in range(2):  # the second step: DDP has rebuilt its buckets
            ddp.zero_grad(set_to_none=True)
            for j in range(virtual.hosted):
                x, y = micro_batch(images, labels, virtual.first + j)
                torch.manual_seed(virtual.first + j)
                with gradients.micro_batch(j):
                    F.cross_entropy(ddp(x), y).backward()
            gradients.finish()
        torch.save({"grads": [p.grad for p in model.parameters()], "buffers": list(model.buffers())}, out)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "summed"])
def test_two_processes_hosting_two_virtual_ranks_each_get_the_mean_over_all_four(tmp_path: Path, exact: bool) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the processes: torch's CPU convolution backward splits its sums by thread
    try:
        expected, statistics = reference()
    finally:
        torch.set_num_threads(threads)
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    mp.spawn(_entry, args=(exact, str(tmp_path / "store"), outs), nprocs=WORLD, join=True)
    for rank, out in enumerate(outs):
        got = torch.load(out, weights_only=True)
        for g, e in zip(got["grads"], expected, strict=True):
            assert torch.equal(g, e) if exact else torch.allclose(g, e, rtol=1e-5, atol=1e-7)
        first = statistics[rank * VIRTUAL // WORLD]  # the first virtual rank this process hosts
        assert all(torch.equal(b, kept) for b, kept in zip(got["buffers"], first, strict=True))


def reference() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """(g0 + g1 + g2 + g3) / 4 added in this order, and each virtual rank's BN statistics after two steps."""
    model, images, labels = model_and_data()
    alone, statistics = [], []
    for v in range(VIRTUAL):  # each virtual rank on its own, as a process of its own computes it
        x, y = micro_batch(images, labels, v)
        twin = copy.deepcopy(model)
        for _ in range(2):  # two steps (the gradient is the same: no optimizer step in between)
            twin.zero_grad(set_to_none=True)
            torch.manual_seed(v)
            F.cross_entropy(twin(x), y).backward()
        alone.append([p.grad for p in twin.parameters()])
        statistics.append(list(twin.buffers()))
    expected = []
    for grads in zip(*alone):
        total = grads[0].clone()
        for g in grads[1:]:
            total += g
        expected.append(total / VIRTUAL)
    return expected, statistics


def _entry(rank: int, exact: bool, store: str, outs: list[str]) -> None:
    process(rank, exact, store, outs[rank])
