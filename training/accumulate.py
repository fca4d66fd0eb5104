"""One step's gradient over all virtual ranks: the mean of their micro-batches' gradients, in one fixed order.

A process hosts h = V / W virtual ranks (`training.virtual`) and runs one micro-batch per hosted virtual
rank per step (`micro_batch`); the step's gradient is (g_0 + g_1 + ... + g_{V-1}) / V, g_v the gradient of
virtual rank v's micro-batch. The code is the same on every device; what differs is how exactly the sum
is formed:

- **exact** (CPU, gloo): every virtual rank's gradient is kept on its own (backward does not add it into
  `.grad`: DDP's `no_sync`, then the gradients are set aside), and DDP's communication hook gathers every
  process's h gradients of a bucket and adds all V in virtual-rank order, g_0 + g_1 + ..., then divides by
  V: the same elementwise operations whatever the world size, so a run that changes its number of
  processes stays bit-identical to one that never did (with the same torch threads per process: torch's
  CPU convolution backward splits its sums by thread). Each process sums a W-th of the elements (an
  all-to-all in the hook brings it everyone's rows of that share) and `finish` gathers the shares (one
  all-gather for all buckets): the traffic and memory of an all-reduce (plus the h gradients a process
  holds), not of gathering every gradient everywhere. Gloo's own ring all-reduce would add in an order that depends on how DDP chunks a bucket,
  and DDP rebuilds its buckets after the first step of every process, so even a resume at the same world
  size would drift in the last bits with 3 or more ranks. Used on the CPU (tests, demos, exact-resume
  checks) only.
- **summed** (GPU, NCCL): standard accumulation, backward adds the micro-batches into `.grad` under
  `no_sync`, and ONE all-reduce per bucket at the last micro-batch sums the processes (the bucket is
  divided by V first). NCCL's sums are not promised in any order anyway.

One process alone (W = 1) needs no hook: backward adds the hosted micro-batches into `.grad` in
virtual-rank order, which is the exact order, and `finish` divides by V.

Batch norm: a process's running statistics are those of its FIRST hosted virtual rank only (process 0's are
virtual rank 0's, what checkpoints and evaluation use, as in a run of V processes): the buffers are put
back after the other micro-batches' forwards. Training-mode batch norm normalises with each batch's own
statistics, so this changes no gradient.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from training.virtual import VirtualRanks


class VirtualGradients:
    """The gradient reduction of one process over all virtual ranks (see the module docstring).

    Args:
        model: the unwrapped model (its parameters and buffers).
        ddp: its DistributedDataParallel wrapper when W > 1 (register `hook` on it), else None.
        virtual: the run's virtual ranks and this process's share.
        exact: keep each virtual rank's gradient apart and add them in virtual-rank order (CPU); else sum into
            `.grad` and all-reduce once (GPU).
    """

    def __init__(self, model: nn.Module, ddp: nn.Module | None, virtual: VirtualRanks, exact: bool) -> None:
        self.model, self.ddp, self.virtual, self.exact = model, ddp, virtual, exact
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._set_aside: list[dict[nn.Parameter, torch.Tensor | None]] = []  # hosted micro-batches before the last
        self._buffers: list[torch.Tensor] | None = None  # the first hosted virtual rank's BN statistics
        self._shares: dict[int, tuple[torch.Tensor, int, list]] = {}  # bucket -> this process's summed share

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """Around the forward and backward of the `index`-th hosted virtual rank's micro-batch (0-based)."""
        last = index == self.virtual.hosted - 1
        if index == 1:
            self._buffers = [b.detach().clone() for b in self.model.buffers()]
        hold = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with hold:
            yield
        if not last and self.exact and self.ddp is not None:  # the hook adds it in its place in the order
            self._set_aside.append({p: p.grad for p in self.params})
            for p in self.params:
                p.grad = None
        if last and self._buffers is not None:
            with torch.no_grad():
                for buffer, kept in zip(self.model.buffers(), self._buffers):
                    buffer.copy_(kept)
            self._buffers = None

    def finish(self) -> None:
        """After the last micro-batch's backward: `.grad` holds the step's mean gradient over all virtual ranks."""
        self._set_aside.clear()
        if self._shares:
            self._gather_shares()
        if self.ddp is None and self.virtual.hosted > 1:  # one process: summed in virtual-rank order by backward
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.div_(self.virtual.total)

    def hook(self, state, bucket):  # noqa: ANN001, ANN201 - DDP inspects a hook's annotations at run time
        """DDP communication hook: the bucket's mean gradient over all virtual ranks (exact or summed)."""
        return self._ordered_mean(bucket) if self.exact else self._summed_mean(bucket)

    def _summed_mean(self, bucket: Any) -> torch.futures.Future:
        tensor = bucket.buffer().div_(self.virtual.total)  # h micro-batches were summed into it; the others add theirs
        return tdist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def _ordered_mean(self, bucket: Any) -> torch.futures.Future:
        """Phase 1 of the exact reduction: this process's share (a W-th of the bucket's elements) summed over all V
        rows in virtual-rank order, after an all-to-all has brought it every process's rows of that share.
        The bucket is left as it is; `finish` gathers the shares (a collective inside this hook's callback
        would wait for gloo's worker threads, which run the callbacks: a deadlock)."""
        tensor = bucket.buffer()
        world, hosted = self.virtual.world_size, self.virtual.hosted
        share = -(-tensor.numel() // world)  # elements each process sums (the last share padded with zeros)
        rows = torch.zeros((hosted, world * share), dtype=tensor.dtype, device=tensor.device)
        for row, aside in zip(rows, self._set_aside):  # this process's earlier micro-batches, in the bucket's layout
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                view = row.as_strided(grad.size(), grad.stride(), row.storage_offset() + _offset(grad, tensor))
                view.copy_(aside[p]) if aside[p] is not None else view.zero_()
        rows[hosted - 1, :tensor.numel()].copy_(tensor)
        send = rows.view(hosted, world, share).transpose(0, 1).contiguous()  # [q] = my rows' share of process q
        received = torch.empty_like(send)  # [q] = process q's rows of my share: virtual ranks q*h .. q*h + h - 1
        layout = [(p, grad.size(), grad.stride(), _offset(grad, tensor)) for p, grad in
                  zip(bucket.parameters(), bucket.gradients())]

        def ordered_sum(exchanged):  # noqa: ANN001, ANN202
            exchanged.wait()  # re-raises the collective's failure: ignored, it left DDP's backward waiting forever
            parts = received.view(world * hosted, share)  # virtual-rank order
            mine = parts[0].clone()
            for part in parts[1:]:
                mine += part
            self._shares[bucket.index()] = (mine.div_(self.virtual.total), tensor.numel(), layout)
            return tensor

        return tdist.all_to_all_single(received, send, async_op=True).get_future().then(ordered_sum)

    def _gather_shares(self) -> None:
        """Phase 2 of the exact reduction: every process's shares of every bucket, into `.grad` (one all-gather)."""
        buckets = sorted(self._shares)  # by DDP's bucket index: the same order in every process
        mine = torch.cat([self._shares[b][0] for b in buckets])
        everyone = [torch.empty_like(mine) for _ in range(self.virtual.world_size)]
        tdist.all_gather(everyone, mine)
        start = 0
        with torch.no_grad():
            for b in buckets:
                share, numel, layout = self._shares[b]
                full = torch.cat([part[start:start + len(share)] for part in everyone])[:numel]
                for p, size, stride, offset in layout:
                    p.grad.copy_(full.as_strided(size, stride, offset))
                start += len(share)
        self._shares.clear()


def _offset(grad: torch.Tensor, buffer: torch.Tensor) -> int:
    """Where a bucket's gradient view starts in the bucket's flat buffer."""
    return grad.storage_offset() - buffer.storage_offset()
