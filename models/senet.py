"""One builder for the bottleneck family, and its named variants.

Names and what they mean (all ImageNet, 224 x 224, 1000 classes by default):

* ``resnet{50,101,152}``, ``se_resnet{50,101,152}``: the released Caffe nets (He et al. 2016;
  Hu et al. arXiv:1709.01507), stride on the first 1x1 of a downsampling block.
  ``stride_in_1x1=False`` gives the "v1.5" nets most modern ports train (stride on the 3x3).
* ``resnext{50,101}_32x4d``, ``se_resnext{50,101}_32x4d``: ResNeXt (Xie et al. 2017), stride on the 3x3.
* ``senet154``: the ILSVRC 2017 entry (arXiv:1709.01507, Appendix): 64 x 4d ResNeXt-152 with the
  first 1x1 of each bottleneck halved, a stem of three 3x3 convs, 3x3 stride-2 projection
  shortcuts and dropout 0.2 — the layout of the released model (Cadene's ``pretrainedmodels``).
* ``se_resnet_tiny``, ``se_resnext_tiny``: small nets for tests and the CPU demo.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from models.blocks import Bottleneck, conv_bn
from models.registry import register_model

EXPANSION = 4  # a bottleneck's output is 4x its base width (He et al. 2016, Table 1)
STEMS = ("7x7", "3x3x3", "3x3")
DOWNSAMPLING = ("stride", "maxpool")


class SENet(nn.Module):
    """Stem -> four stages of bottlenecks -> global average pool -> dropout -> FC.

    Args:
        depths: blocks per stage, e.g. (3, 4, 6, 3) for the 50-layer nets.
        num_classes: classifier outputs.
        groups: cardinality of the 3x3 convs (1 for ResNet).
        width_per_group: 3x3 width per group in stage 1; doubles each stage. ResNet: 64, ResNeXt 32x4d: 4.
        base_channels: stage-1 base width; a stage outputs ``EXPANSION * base_channels * 2**i``.
        reduce_ratio: first 1x1 width relative to the 3x3 width (SENet-154 halves it: 0.5).
        se_reduction: SE ratio r (16 in the paper); ``None`` for the plain baseline.
        stem: ``"7x7"`` (one 7x7/2 conv) or ``"3x3x3"`` (three 3x3 convs, the first strided, SENet-154),
            each followed by a 3x3/2 max-pool; or ``"3x3"`` (one 3x3 conv at full resolution, no pooling:
            for small inputs).
        downsample: ``"stride"``, the papers' strided first block of stages 2-4; or ``"maxpool"``, a 2x2
            max-pool before every stage and blocks at stride 1 (the small-input nets: see se_resnext_tiny).
        stem_channels: output channels of the stem (the 3x3x3 stem's inner convs use half).
        stride_in_1x1: stride on the first 1x1 (Caffe) instead of the 3x3 (v1.5).
        shortcut_kernel_size: kernel of strided projection shortcuts (SENet-154: 3).
        dropout: drop probability before the classifier (SENet-154: 0.2).
        zero_init_last_bn: start every block's last BN gamma at zero (Goyal et al. 2017).
        channels_last: keep weights and activations in channels-last (NHWC) memory format.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        base_channels: int = 64,
        reduce_ratio: float = 1.0,
        se_reduction: int | None = None,
        stem: str = "7x7",
        stem_channels: int = 64,
        downsample: str = "stride",
        stride_in_1x1: bool = False,
        shortcut_kernel_size: int = 1,
        dropout: float = 0.0,
        zero_init_last_bn: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"unknown downsample {downsample!r}; use one of {', '.join(DOWNSAMPLING)}")
        if len(depths) == 0 or any(d < 1 for d in depths):
            raise ValueError(f"depths must be positive block counts per stage, got {tuple(depths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.channels_last = channels_last
        self.stem = _stem(stem, stem_channels)
        stages, in_channels = [], stem_channels
        for i, depth in enumerate(depths):
            width = groups * width_per_group * 2**i
            out_channels = EXPANSION * base_channels * 2**i
            blocks: list[nn.Module] = [nn.MaxPool2d(2)] if downsample == "maxpool" else []
            for j in range(depth):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        int(width * reduce_ratio),
                        width,
                        out_channels,
                        # stage 1 follows the stem's max-pool
                        stride=2 if (j == 0 and i > 0 and downsample == "stride") else 1,
                        groups=groups,
                        stride_in_1x1=stride_in_1x1,
                        se_reduction=se_reduction,
                        shortcut_kernel_size=shortcut_kernel_size,
                    )
                )
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Global pooling instead of the Caffe 7x7 average pool: identical at 224, and any size works.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_last_bn)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self, zero_init_last_bn: bool) -> None:
        """He (fan-out) init for convs, BN at identity (He et al. 2015; torchvision's choice)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last_bn()

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages: the last feature map, (N, C, H/32, W/32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (N, num_classes)."""
        return self.fc(self.dropout(self.pool(self.forward_features(x)).flatten(1)))


def _stem(kind: str, channels: int) -> nn.Sequential:
    """Stem ending in the Caffe max-pool (3x3/2, no padding, ceil mode: 112 -> 56 at 224); the small-input
    "3x3" stem keeps the full resolution."""
    if kind == "3x3":
        return nn.Sequential(*conv_bn(3, channels, 3), nn.ReLU(inplace=True))
    if kind == "7x7":
        layers = [*conv_bn(3, channels, 7, stride=2), nn.ReLU(inplace=True)]
    else:  # SENet-154: three 3x3 convs (64, 64, 128) instead of one 7x7
        inner = channels // 2
        layers = [
            *conv_bn(3, inner, 3, stride=2), nn.ReLU(inplace=True),
            *conv_bn(inner, inner, 3), nn.ReLU(inplace=True),
            *conv_bn(inner, channels, 3), nn.ReLU(inplace=True),
        ]  # fmt: skip
    return nn.Sequential(*layers, nn.MaxPool2d(3, stride=2, ceil_mode=True))


def _build(arch: dict[str, Any], overrides: dict[str, Any]) -> SENet:
    return SENet(**{**arch, **overrides})


_RESNET = dict(width_per_group=64, stride_in_1x1=True)  # Caffe: stride on the first 1x1
_RESNEXT_32X4D = dict(groups=32, width_per_group=4)
_SE = dict(se_reduction=16)


@register_model
def resnet50(**overrides: Any) -> SENet:
    """ResNet-50 (He et al. 2016), Caffe layout: 25.6 M params, 3.86 GFLOPs."""
    return _build(dict(depths=(3, 4, 6, 3), **_RESNET), overrides)


@register_model
def resnet101(**overrides: Any) -> SENet:
    """ResNet-101, Caffe layout: 44.5 M params, 7.58 GFLOPs."""
    return _build(dict(depths=(3, 4, 23, 3), **_RESNET), overrides)


@register_model
def resnet152(**overrides: Any) -> SENet:
    """ResNet-152, Caffe layout: 60.2 M params, 11.30 GFLOPs."""
    return _build(dict(depths=(3, 8, 36, 3), **_RESNET), overrides)


@register_model
def resnext50_32x4d(**overrides: Any) -> SENet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 25.0 M params, 4.24 GFLOPs."""
    return _build(dict(depths=(3, 4, 6, 3), **_RESNEXT_32X4D), overrides)


@register_model
def resnext101_32x4d(**overrides: Any) -> SENet:
    """ResNeXt-101 32x4d: 44.2 M params, 7.99 GFLOPs."""
    return _build(dict(depths=(3, 4, 23, 3), **_RESNEXT_32X4D), overrides)


@register_model
def se_resnet50(**overrides: Any) -> SENet:
    """SE-ResNet-50 (arXiv:1709.01507, Table 2): 28.1 M params, 3.87 GFLOPs."""
    return _build(dict(depths=(3, 4, 6, 3), **_RESNET, **_SE), overrides)


@register_model
def se_resnet101(**overrides: Any) -> SENet:
    """SE-ResNet-101: 49.3 M params, 7.60 GFLOPs."""
    return _build(dict(depths=(3, 4, 23, 3), **_RESNET, **_SE), overrides)


@register_model
def se_resnet152(**overrides: Any) -> SENet:
    """SE-ResNet-152: 66.8 M params, 11.32 GFLOPs."""
    return _build(dict(depths=(3, 8, 36, 3), **_RESNET, **_SE), overrides)


@register_model
def se_resnext50_32x4d(**overrides: Any) -> SENet:
    """SE-ResNeXt-50 32x4d: 27.6 M params, 4.25 GFLOPs."""
    return _build(dict(depths=(3, 4, 6, 3), **_RESNEXT_32X4D, **_SE), overrides)


@register_model
def se_resnext101_32x4d(**overrides: Any) -> SENet:
    """SE-ResNeXt-101 32x4d: 49.0 M params, 8.00 GFLOPs."""
    return _build(dict(depths=(3, 4, 23, 3), **_RESNEXT_32X4D, **_SE), overrides)


@register_model
def senet154(**overrides: Any) -> SENet:
    """SENet-154 (arXiv:1709.01507, Appendix; the released model): 115.1 M params, 20.7 GFLOPs."""
    arch = dict(
        depths=(3, 8, 36, 3),
        groups=64,
        width_per_group=4,
        reduce_ratio=0.5,  # first 1x1 halved: 128 -> 256 (64 x 4d) in stage 1
        stem="3x3x3",
        stem_channels=128,
        shortcut_kernel_size=3,
        dropout=0.2,
        **_SE,
    )
    return _build(arch, overrides)


# Small nets: about 1/4 of the standard widths and one block per stage, for tests and the CPU demo.
# The tiny nets are for small inputs (48-96 px) on a CPU: a 3x3 stem at full resolution and a 2x2
# max-pool before each stage instead of strided blocks: on little data, strided convolutions need many
# more steps to become translation-tolerant shape detectors (the comparison that chose this, with its
# machine: benchmarks/RESULTS_models.md, "Tiny nets"). The paper's nets above are unchanged.
_TINY = dict(depths=(1, 1, 1, 1), base_channels=16, stem_channels=16, stem="3x3", downsample="maxpool", **_SE)


@register_model
def se_resnet_tiny(**overrides: Any) -> SENet:
    """A 4-block SE-ResNet (widths 16-128, outputs 64-512) for small inputs, trains in minutes on 2 CPU cores."""
    return _build(dict(width_per_group=16, **_TINY), overrides)


@register_model
def se_resnext_tiny(**overrides: Any) -> SENet:
    """A 4-block SE-ResNeXt 8x4d (3x3 widths 32-256, outputs 64-512) for small inputs: tests and the CPU demo."""
    return _build(dict(groups=8, width_per_group=4, **_TINY), overrides)
