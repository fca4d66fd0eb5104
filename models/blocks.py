"""Building blocks of the bottleneck family: ResNet, ResNeXt, SE-ResNet, SE-ResNeXt, SENet-154."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.se import SqueezeExcitation, scale_and_add


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """A bias-free conv followed by BatchNorm, the unit every Caffe ResNet/SENet layer is made of."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped) -> 1x1 expand, optional SE, plus shortcut.

    ResNet (He et al. 2016, Fig. 5), ResNeXt (Xie et al. 2017, Fig. 3c) and the SE-ResNet module
    (arXiv:1709.01507, Fig. 3): SE gates the residual branch after its last BN and before the
    identity addition. The scale is fused into the addition (``addcmul``), so SE adds a pooling
    pass (over the 4x narrower conv3 input at inference, see :meth:`squeeze`) and two tiny FCs.

    Args:
        in_channels: channels entering the block.
        reduce_channels: output of the first 1x1 (equal to ``width`` except in SENet-154,
            which halves it).
        width: channels of the 3x3 conv (groups x width per group in ResNeXt terms).
        out_channels: channels leaving the block.
        stride: spatial stride of the block.
        groups: groups of the 3x3 conv (the ResNeXt cardinality).
        stride_in_1x1: put the stride on the first 1x1 (the released Caffe ResNets and SE-ResNets)
            instead of the 3x3 ("v1.5", ResNeXt, SENet-154).
        se_reduction: SE reduction ratio r; ``None`` builds the plain block.
        shortcut_kernel_size: kernel of a *strided* projection shortcut (SENet-154 uses 3);
            a stride-1 projection is always 1x1, as in the released SENet-154.
    """

    def __init__(
        self,
        in_channels: int,
        reduce_channels: int,
        width: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        stride_in_1x1: bool = False,
        se_reduction: int | None = None,
        shortcut_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = conv_bn(in_channels, reduce_channels, 1, stride_1x1)
        self.conv2, self.bn2 = conv_bn(reduce_channels, width, 3, stride_3x3, groups)
        self.conv3, self.bn3 = conv_bn(width, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.se = SqueezeExcitation(out_channels, se_reduction) if se_reduction else None
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            kernel = shortcut_kernel_size if stride != 1 else 1
            self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, kernel, stride))

    def zero_init_last_bn(self) -> None:
        """Zero the last BN's gamma: the residual branch starts at 0 (Goyal et al. 2017, sec. 5.1)."""
        nn.init.zeros_(self.bn3.weight)

    def squeeze(self, branch: Tensor, conv3_input: Tensor) -> Tensor | None:
        """SE squeeze of ``branch`` = bn3(conv3(conv3_input)) read from the 4x narrower conv3 input.

        Inference only. With running statistics, BN is a per-channel affine map and conv3 a 1x1
        linear map, so both commute with the spatial mean: pooling conv3's input and applying the
        two maps to the pooled vector gives the same squeeze while reading a quarter of the bytes
        (the squeeze pass is most of SE's CPU inference cost). ``None`` where it does not pay,
        and in training, where BN normalizes with batch statistics.
        """
        bn = self.bn3
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return None
        _, width, height, w = conv3_input.shape
        out_channels = branch.shape[1]
        # Worth it only when the activation bytes saved exceed conv3's weights, read a second time:
        # not in the late stages (stage 4 at 7x7 reads 1 M weights to save 0.15 M per image). Decided per
        # image, never per batch: the two paths differ in the last bits, and the same image must score
        # the same whatever batch it is in (engine eval vs `senet predict`, a short last batch).
        if height * w * (out_channels - width) <= width * out_channels:
            return None
        pooled = F.linear(conv3_input.mean((2, 3)), self.conv3.weight.flatten(1))
        return (pooled - bn.running_mean) * (bn.weight * torch.rsqrt(bn.running_var + bn.eps)) + bn.bias

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch, SE gate, fused scale + identity addition, ReLU."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        hidden = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(hidden))
        if self.se is None:
            out = out.add_(identity)
        else:
            out = scale_and_add(identity, out, self.se(out, self.squeeze(out, hidden)))
        return self.relu(out)
