"""The Squeeze-and-Excitation block (Hu et al., arXiv:1709.01507, section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation gate (arXiv:1709.01507, Fig. 1 and Eq. 2-4).

    squeeze = global average pool; excitation = FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid.
    ``forward`` returns the gate, shaped (N, C, 1, 1); the caller applies the scale (Eq. 4). That
    lets a residual block fuse scale and identity addition into one kernel
    (:func:`scale_and_add`, ``torch.addcmul``): one pass over the tensor instead of two.
    A plain feature map (SE-BN-Inception) uses :meth:`scale`.

    Args:
        channels: C, the number of channels gated.
        reduction: r, the reduction ratio of the bottleneck; the paper uses 16.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or channels // reduction < 1:
            raise ValueError(
                f"SE needs channels >= reduction >= 1, got channels={channels}, reduction={reduction}; "
                "lower the reduction ratio or widen the layer"
            )
        # The paper's C/r. NVIDIA DeepLearningExamples uses a fixed 16 instead, which is not the paper.
        self.hidden = channels // reduction
        # Linear layers on the pooled (N, C) vector: same parameters as Caffe's 1x1 convs with bias,
        # and cheaper than a 1x1 conv on a 1x1 map on CPU.
        self.reduce = nn.Linear(channels, self.hidden)
        self.expand = nn.Linear(self.hidden, channels)

    def forward(self, x: Tensor, squeezed: Tensor | None = None) -> Tensor:
        """Per-channel gate in (0, 1) for ``x`` (N, C, H, W), shaped (N, C, 1, 1) to broadcast.

        ``squeezed`` is ``x.mean((2, 3))`` when the caller already has it more cheaply
        (see ``Bottleneck.squeeze``); it is computed here otherwise.
        """
        if squeezed is None:
            # Squeeze, Eq. 2: the global average pool, as sum / (H W) rather than mean(): the backward
            # of sum is a broadcast view, mean's writes a full-size gradient tensor (a pass per block).
            squeezed = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
        excited = self.expand(F.relu(self.reduce(squeezed), inplace=True)).sigmoid()  # excitation, Eq. 3
        return excited.view(x.shape[0], x.shape[1], 1, 1)

    def scale(self, x: Tensor) -> Tensor:
        """``x`` rescaled channel-wise by its own gate (Eq. 4)."""
        return x * self(x)


def scale_and_add(identity: Tensor, branch: Tensor, gate: Tensor) -> Tensor:
    """``identity + branch * gate`` in one fused kernel (SE-ResNet module, paper Fig. 3).

    When autograd does not need ``branch`` (inference), the result overwrites ``branch``:
    a fresh activation-sized buffer per block costs an allocation and page faults on CPU.
    """
    gate = gate.to(branch.dtype)  # a no-op normally; keeps a bf16 branch bf16 if the gate came out fp32
    recording = torch.is_grad_enabled() and (branch.requires_grad or gate.requires_grad or identity.requires_grad)
    if recording or identity.dtype != branch.dtype:
        return torch.addcmul(identity, branch, gate)  # autograd saves branch and gate for backward
    return torch.addcmul(identity, branch, gate, out=branch)
