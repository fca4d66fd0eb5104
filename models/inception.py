"""BN-Inception (Ioffe & Szegedy 2015) and SE-BN-Inception (Hu et al., arXiv:1709.01507, Fig. 2).

The layout is the Caffe BN-Inception that Cadene's ``pretrainedmodels`` ports: conv1 7x7/2 64,
max-pool, conv2 1x1 64 + 3x3 192, max-pool, Inception 3a 3b 3c(/2) 4a 4b 4c 4d 4e(/2) 5a 5b,
global average pool, FC. All max-pools use Caffe's ceil rounding (224 -> 112 -> 56 -> 28 -> 14 -> 7).
SE-BN-Inception adds one SE block on the output of each Inception module.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from models.registry import register_model
from models.se import SqueezeExcitation


class InceptionSpec(NamedTuple):
    """Branch widths of one Inception module (Ioffe & Szegedy 2015, Fig. 5 and Table 1)."""

    single: int  # 1x1 branch (0: absent, in the stride-2 modules)
    reduce3: int  # 1x1 before the 3x3 branch
    out3: int
    reduce_d3: int  # 1x1 before the double-3x3 branch
    out_d3: int
    pool: str  # "avg" or "max"
    proj: int  # 1x1 after the pool (0: pass-through, in the stride-2 modules)
    stride: int = 1


# The ten modules of the released model; input channels follow from the previous module's outputs.
MODULES: dict[str, InceptionSpec] = {
    "3a": InceptionSpec(64, 64, 64, 64, 96, "avg", 32),
    "3b": InceptionSpec(64, 64, 96, 64, 96, "avg", 64),
    "3c": InceptionSpec(0, 128, 160, 64, 96, "max", 0, stride=2),
    "4a": InceptionSpec(224, 64, 96, 96, 128, "avg", 128),
    "4b": InceptionSpec(192, 96, 128, 96, 128, "avg", 128),
    "4c": InceptionSpec(160, 128, 160, 128, 160, "avg", 128),
    "4d": InceptionSpec(96, 128, 192, 160, 192, "avg", 128),
    "4e": InceptionSpec(0, 128, 192, 192, 256, "max", 0, stride=2),
    "5a": InceptionSpec(352, 192, 320, 160, 224, "avg", 128),
    "5b": InceptionSpec(352, 192, 320, 192, 224, "max", 128),
}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv -> BN -> ReLU. The conv has no bias: BN's shift makes it redundant."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """One BN-Inception module: parallel 1x1, 3x3, double-3x3 and pool branches, concatenated.

    Args:
        in_channels: channels entering the module.
        spec: the branch widths.
        se_reduction: SE ratio r on the concatenated output; ``None`` for plain BN-Inception.
    """

    def __init__(self, in_channels: int, spec: InceptionSpec, se_reduction: int | None = None) -> None:
        super().__init__()
        s = spec.stride
        self.single = conv_bn_relu(in_channels, spec.single, 1) if spec.single else None
        self.branch3 = nn.Sequential(
            conv_bn_relu(in_channels, spec.reduce3, 1), conv_bn_relu(spec.reduce3, spec.out3, 3, s)
        )
        self.branch_d3 = nn.Sequential(
            conv_bn_relu(in_channels, spec.reduce_d3, 1),
            conv_bn_relu(spec.reduce_d3, spec.out_d3, 3),
            conv_bn_relu(spec.out_d3, spec.out_d3, 3, s),
        )
        # Caffe pools: avg counts the zero padding, ceil rounding keeps 28 -> 14 -> 7 at 224.
        pool_cls = nn.AvgPool2d if spec.pool == "avg" else nn.MaxPool2d
        pool = pool_cls(3, stride=s, padding=1 if s == 1 else 0, ceil_mode=True)
        self.pool = nn.Sequential(pool, conv_bn_relu(in_channels, spec.proj, 1)) if spec.proj else pool
        self.out_channels = spec.single + spec.out3 + spec.out_d3 + (spec.proj or in_channels)
        self.se = SqueezeExcitation(self.out_channels, se_reduction) if se_reduction else None

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branches along channels, then (SE-BN-Inception) rescale them."""
        branches = [self.branch3(x), self.branch_d3(x), self.pool(x)]
        if self.single is not None:
            branches.insert(0, self.single(x))
        out = torch.cat(branches, 1)
        return out if self.se is None else self.se.scale(out)


class BNInception(nn.Module):
    """BN-Inception classifier, optionally with SE on each Inception module.

    Args:
        num_classes: classifier outputs.
        se_reduction: SE ratio r (16 in the paper); ``None`` for plain BN-Inception.
        dropout: drop probability before the classifier (0: the released model has none).
        channels_last: keep weights and activations in channels-last (NHWC) memory format.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        se_reduction: int | None = None,
        dropout: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.channels_last = channels_last
        self.stem = nn.Sequential(
            conv_bn_relu(3, 64, 7, stride=2),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            conv_bn_relu(64, 64, 1),
            conv_bn_relu(64, 192, 3),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        modules, channels = {}, 192
        for name, spec in MODULES.items():
            modules[name] = Inception(channels, spec, se_reduction)
            channels = modules[name].out_channels
        self.inception = nn.Sequential(*modules.values())
        self.pool = nn.AdaptiveAvgPool2d(1)  # the Caffe 7x7 average pool, at any input size
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (N, num_classes)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.inception(self.stem(x))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


@register_model
def bn_inception(**overrides: Any) -> BNInception:
    """BN-Inception (Ioffe & Szegedy 2015), the released Caffe layout: 2.03 GFLOPs."""
    return BNInception(**overrides)


@register_model
def se_bn_inception(**overrides: Any) -> BNInception:
    """SE-BN-Inception (arXiv:1709.01507, Table 2): 2.04 GFLOPs."""
    return BNInception(**{"se_reduction": 16, **overrides})
