"""Published SENet weights: which released networks our registry rebuilds, and their state dicts in our names.

The original Caffe SENets (Hu et al., github.com/hujie-frank/SENet) as converted to PyTorch by the
`pretrainedmodels` package (Cadene) are the six networks below; timm's `legacy_*` models are the same
networks with the same state-dict keys. Our registry's networks of the same names are those networks
with the default options (Caffe layout: the stride on the first 1x1 of the SE-ResNets, on the 3x3 of
the SE-ResNeXts and SENet-154; SENet-154's three-conv stem and 3x3 projection shortcuts), so a
converted state dict needs no model options.

Key mapping (source -> ours):

    layer0.conv1/bn1 (7x7 stem)             stem.0 / stem.1
    layer0.conv1..3/bn1..3 (SENet-154)       stem.0, stem.1, stem.3, stem.4, stem.6, stem.7
    layer{k}.{j}.conv{n} / bn{n}             stages.{k-1}.{j}.conv{n} / bn{n}
    layer{k}.{j}.se_module.fc1 / fc2         stages.{k-1}.{j}.se.reduce / expand (1x1 conv -> linear)
    layer{k}.{j}.downsample.0 / 1            stages.{k-1}.{j}.shortcut.0 / 1
    last_linear                              fc

timm's own (non-legacy) `seresnet*` / `seresnext*` are different networks (the stride on the 3x3 of
every block, a padded max-pool, other key names) and are refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SOURCES = ("pretrainedmodels", "timm")
# The released networks: our registry name -> the source's names.
RELEASED = {
    "se_resnet50": {"pretrainedmodels": "se_resnet50", "timm": "legacy_seresnet50"},
    "se_resnet101": {"pretrainedmodels": "se_resnet101", "timm": "legacy_seresnet101"},
    "se_resnet152": {"pretrainedmodels": "se_resnet152", "timm": "legacy_seresnet152"},
    "se_resnext50_32x4d": {"pretrainedmodels": "se_resnext50_32x4d", "timm": "legacy_seresnext50_32x4d"},
    "se_resnext101_32x4d": {"pretrainedmodels": "se_resnext101_32x4d", "timm": "legacy_seresnext101_32x4d"},
    "senet154": {"pretrainedmodels": "senet154", "timm": "legacy_senet154"},
}
# timm names of other networks that look alike: refused with a reason.
TIMM_NOT_RELEASED = re.compile(r"^(seresnet|seresnext|seresnextaa|senet)\d")


@dataclass(frozen=True)
class Preprocessing:
    """What a released network expects: RGB on 0-255 normalised by mean/std (0-255 scale), the short side
    resized to crop / crop_ratio, a centre crop, bilinear interpolation."""

    crop_size: int = 224
    crop_ratio: float = 0.875
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # the sources' [0.485, 0.456, 0.406] x 255
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)  # [0.229, 0.224, 0.225] x 255
    interpolation: str = "bilinear"
    input_range: tuple[float, float] = (0.0, 1.0)  # the sources' own input scale (ours is 0-255: mean/std scaled)


# Top-1 / top-5 accuracy (%) on ILSVRC2012 val, single centre crop 224 of 256: pretrainedmodels' README
# ("Accuracy on validation set (single model)", version 0.7.4), the Caffe originals and Cadene's ports.
REPORTED = {
    "se_resnet50": {"caffe": (77.63, 93.64), "pretrainedmodels": (77.636, 93.752)},
    "se_resnet101": {"caffe": (78.25, 94.28), "pretrainedmodels": (78.396, 94.258)},
    "se_resnet152": {"caffe": (78.66, 94.46), "pretrainedmodels": (78.658, 94.374)},
    "se_resnext50_32x4d": {"caffe": (79.03, 94.46), "pretrainedmodels": (79.076, 94.434)},
    "se_resnext101_32x4d": {"caffe": (80.19, 95.04), "pretrainedmodels": (80.236, 95.028)},
    "senet154": {"caffe": (81.32, 95.53), "pretrainedmodels": (81.304, 95.498)},
}


class ConversionError(ValueError):
    """A source state dict that does not fit the network it is said to be; one line naming the keys."""


def registry_name(arch: str, source: str) -> str:
    """Our registry name for `arch` given in either naming ('se_resnext50_32x4d' or 'legacy_seresnext50_32x4d').

    Raises:
        ConversionError: an unknown source, a network that was not released, or timm's non-legacy SENets.
    """
    if source not in SOURCES:
        raise ConversionError(f"--from {source!r}: use one of {', '.join(SOURCES)}")
    for ours, names in RELEASED.items():
        if arch in (ours, names[source]):
            return ours
    if source == "timm" and TIMM_NOT_RELEASED.match(arch):
        raise ConversionError(f"timm's {arch!r} is not a released Caffe SENet (stride on the 3x3, a padded max-pool, "
                              f"other keys); senet imports timm's legacy_* ports: "
                              f"{', '.join(n['timm'] for n in RELEASED.values())}")
    names = ", ".join(names[source] for names in RELEASED.values())
    raise ConversionError(f"--arch {arch!r} is not one of the released SENets {source} provides: {names}")


def convert(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source's state dict in our names and shapes, checked against `target` (our model's state dict).

    Every source key must land on a target key of the same number of elements, and every target key
    must be filled; BatchNorm's `num_batches_tracked` (absent from checkpoints of older PyTorch, unused
    at inference) is the one exception, kept from the target.

    Raises:
        ConversionError: unexpected or missing keys, or a shape that does not fit; one line naming them.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in source.items():
        ours = _our_key(key)
        if ours is None or ours not in target:
            unexpected.append(key)
            continue
        if value.numel() != target[ours].numel():
            raise ConversionError(f"{key}: {tuple(value.shape)} does not fit {ours} {tuple(target[ours].shape)}: the "
                                  f"weights belong to another network")
        out[ours] = value.reshape(target[ours].shape).clone()
    missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        parts = ([f"{len(unexpected)} unexpected source key(s) ({', '.join(unexpected[:3])}...)"] if unexpected else []) \
            + ([f"{len(missing)} missing key(s) ({', '.join(missing[:3])}...)"] if missing else [])
        raise ConversionError(f"the state dict does not fit this network: {'; '.join(parts)}")
    for key in target:
        out.setdefault(key, target[key].clone())
    return out


_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def _our_key(key: str) -> str | None:
    """The name of a source key in our model (None: no such place)."""
    key = key.removeprefix("module.")  # a DataParallel-saved dict
    if key.startswith("layer0."):
        layer, _, rest = key[len("layer0."):].partition(".")
        return f"stem.{_STEM[layer]}.{rest}" if layer in _STEM else None
    if key.startswith("last_linear."):
        return "fc." + key[len("last_linear."):]
    m = _BLOCK.match(key)
    if m is None:
        return None
    stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
    rest = rest.replace("se_module.fc1.", "se.reduce.").replace("se_module.fc2.", "se.expand.")
    rest = rest.replace("downsample.", "shortcut.")
    return f"stages.{stage}.{block}.{rest}"
