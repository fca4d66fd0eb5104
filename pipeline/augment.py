"""Training augmentation as numbers: the spec, and each sample's parameters drawn on the host.

Every random choice for a sample comes from ``np.random.default_rng((seed, epoch, position))``, where
`position` is the sample's GLOBAL position in the epoch's order (see pipeline.sampling). So what a
sample receives does not depend on the world size, on how far DALI prefetches, or on where a run was
resumed; a resumed run needs only (epoch, position).

The draws are turned into arguments for ONE resampling pass (pipeline.dali) and ONE colour pass
(pipeline.loader.apply_colour):

- geometry: random-size crop (as torchvision's RandomResizedCrop: area fraction, log-uniform aspect,
  10 tries, then a centre crop), mirror flip and rotation about the crop's centre become a single 2x3
  matrix mapping output pixels to the decoded region, plus that region (the bounding box of the
  rotated crop, so a rotated crop shows image content in its corners wherever the image has some;
  beyond the image's edge the edge pixels repeat, where torchvision would paint black). When the
  warp would shrink by more than 2x, the region is first resized with an antialiasing filter.
- colour: brightness, contrast, saturation and hue (applied in that fixed order; torchvision shuffles
  it) and the ImageNet normalisation are one per-sample affine map ``out = M @ rgb + t0 + v *
  gray_mean`` where gray_mean is the mean luma of the warped crop (contrast pivots on it, as
  torchvision's does). No clipping between the steps: the map stays linear (DALI's color_twist does
  not clip either).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# ImageNet statistics on the 0-255 scale, RGB.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's and torchvision's grayscale
CROP_TRIES = 10  # RandomResizedCrop's attempts before falling back to a centre crop
# A bilinear warp aliases when it shrinks by more than ~2x (it reads 2x2 pixels per output pixel);
# such regions are first resized with an antialiasing filter so that the warp shrinks by <= 1.5x.
ALIAS_FREE_SHRINK = 2.0
PRESCALE_SHRINK = 1.5
_UNIFORMS = 4 * CROP_TRIES + 6  # uniforms drawn per sample: crop tries, flip, angle, 4 colour factors
# YIQ <-> RGB, for the hue rotation (DALI's and torchvision-like hue shifts rotate chroma this way).
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_GREY = np.outer(np.ones(3), LUMA)  # rgb -> (luma, luma, luma)


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation; field names are those of the training config's `data` section.

    Every augmentation can be switched off: flip, rotation and the colour factors by 0; the
    random-size crop by min_area = max_area = 1 and min_aspect = max_aspect = 1 (a centre crop).
    """

    min_area: float = 0.08  # random-size crop: area fraction of the image
    max_area: float = 1.0
    min_aspect: float = 3 / 4  # width / height, drawn log-uniformly
    max_aspect: float = 4 / 3
    flip: float = 0.5  # probability of a mirror flip
    rotation: float = 10.0  # degrees, uniform in +-rotation; positive turns the content counter-clockwise
    brightness: float = 0.4  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0  # shift uniform in +-hue of a full turn

    def __post_init__(self) -> None:
        checks = [
            ("min_area", 0 < self.min_area <= self.max_area <= 1, "0 < min_area <= max_area <= 1"),
            ("min_aspect", 0 < self.min_aspect <= self.max_aspect, "0 < min_aspect <= max_aspect"),
            ("flip", 0 <= self.flip <= 1, "a probability in [0, 1]"),
            ("rotation", 0 <= self.rotation <= 180, "degrees in [0, 180]"),
            ("brightness", 0 <= self.brightness <= 1, "in [0, 1]"),
            ("contrast", 0 <= self.contrast <= 1, "in [0, 1]"),
            ("saturation", 0 <= self.saturation <= 1, "in [0, 1]"),
            ("hue", 0 <= self.hue <= 0.5, "a fraction of a turn in [0, 0.5]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"augmentation {name}={getattr(self, name)!r} is invalid: it must be {rule} "
                                 f"(got {self})")

    @classmethod
    def from_config(cls, data: Any) -> AugmentSpec:
        """The spec from any object with these attributes (the training config's `data` section)."""
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    @classmethod
    def off(cls) -> AugmentSpec:
        """No augmentation: a centre square crop, no flip, rotation or colour change."""
        return cls(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def colour_on(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: crop box in image pixels, flip, angle (degrees), colour factors."""

    x: int
    y: int
    w: int
    h: int
    flip: bool
    angle: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


def draw(spec: AugmentSpec, seed: int, epoch: int, position: int, width: int, height: int) -> Draw:
    """The augmentation of the sample at global `position` of `epoch`, for an image of width x height.

    A pure function: the same arguments give the same Draw in any process. A fixed number of
    uniforms is drawn whatever happens, so adding a try never shifts the later draws.
    """
    u = np.random.default_rng((seed, epoch, position)).random(_UNIFORMS).tolist()  # floats: cheaper scalar math
    x, y, w, h = _crop_box(spec, u[: 4 * CROP_TRIES], width, height)
    flip, angle, b, c, s, hue = u[4 * CROP_TRIES:]
    return Draw(x, y, w, h, bool(flip < spec.flip), float((2 * angle - 1) * spec.rotation),
                _factor(b, spec.brightness), _factor(c, spec.contrast), _factor(s, spec.saturation),
                float((2 * hue - 1) * spec.hue))


def _factor(u: float, jitter: float) -> float:
    """A colour factor uniform in [max(0, 1 - jitter), 1 + jitter] (torchvision's range)."""
    lo = max(0.0, 1.0 - jitter)
    return float(lo + u * (1.0 + jitter - lo))


def _crop_box(spec: AugmentSpec, u: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (x, y, w, h): area and log-aspect tries, else a centre crop."""
    area = width * height
    lo, hi = math.log(spec.min_aspect), math.log(spec.max_aspect)
    for t in range(CROP_TRIES):
        target = area * (spec.min_area + u[t] * (spec.max_area - spec.min_area))
        aspect = math.exp(lo + u[CROP_TRIES + t] * (hi - lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x = int(u[2 * CROP_TRIES + t] * (width - w + 1))
            y = int(u[3 * CROP_TRIES + t] * (height - h + 1))
            return min(x, width - w), min(y, height - h), w, h
    ratio = width / height
    if ratio < spec.min_aspect:
        w, h = width, min(height, round(width / spec.min_aspect))
    elif ratio > spec.max_aspect:
        w, h = min(width, round(height * spec.max_aspect)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def warp_geometry(d: Draw, width: int, height: int, out_size: int) -> dict[str, np.ndarray]:
    """The region to decode, an optional antialiased pre-resize of it, and the warp matrix.

    Returns:
        anchor (y, x) and shape (h, w) of the region, int32, inside the image; prescale (bool) and
        pre_size (h, w, float32: the region's size after the pre-resize, its own size when none);
        matrix: the 2x3 float32 destination-to-source matrix of DALI's warp_affine (continuous
        coordinates, [0, 0] = the first pixel's corner) into the (pre-resized) region. Flip, scale
        and rotation are all in it.
    """
    a = math.radians(d.angle)
    cos, sin = math.cos(a), math.sin(a)
    fw = (-d.w if d.flip else d.w) / out_size
    fh = d.h / out_size
    # Output offsets from the centre, scaled to crop pixels (mirrored when flipped) and turned so that
    # the content turns counter-clockwise by `angle` on screen (y points down): src = lin @ out + off.
    l00, l01, l10, l11 = cos * fw, -sin * fh, sin * fw, cos * fh
    cx, cy, half = d.x + d.w / 2, d.y + d.h / 2, out_size / 2
    reach_x = (abs(l00) + abs(l01)) * half  # the rotated crop's bounding box, around its centre
    reach_y = (abs(l10) + abs(l11)) * half
    x0 = max(0, math.floor(cx - reach_x) - 1)  # one pixel of margin for bilinear taps
    y0 = max(0, math.floor(cy - reach_y) - 1)
    x1 = min(width, math.ceil(cx + reach_x) + 1)
    y1 = min(height, math.ceil(cy + reach_y) + 1)
    rw, rh = x1 - x0, y1 - y0
    rows = [[l00, l01, cx - x0 - (l00 + l01) * half], [l10, l11, cy - y0 - (l10 + l11) * half]]
    shrink = max(d.w, d.h) / out_size
    prescale = shrink > ALIAS_FREE_SHRINK
    pre_w, pre_h = float(rw), float(rh)
    if prescale:
        pre_w = max(1.0, round(rw * PRESCALE_SHRINK / shrink))
        pre_h = max(1.0, round(rh * PRESCALE_SHRINK / shrink))
        rows = [[v * pre_w / rw for v in rows[0]], [v * pre_h / rh for v in rows[1]]]
    return {"anchor": np.array([y0, x0], np.int32), "shape": np.array([rh, rw], np.int32),
            "prescale": np.array(prescale), "pre_size": np.array([pre_h, pre_w], np.float32),
            "matrix": np.array(rows, np.float32)}


def colour_params(d: Draw, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """`colour_transform` packed as one float32 (3, 5) array [M | t0 | v], one per sample for the graph."""
    m, t0, v = colour_transform(d, mean, std)
    return np.concatenate([m, t0[:, None], v[:, None]], axis=1)


def colour_transform(d: Draw, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brightness, contrast, saturation, hue and normalisation as ``M @ rgb + t0 + v * gray_mean``.

    gray_mean is the luma mean of the image before any colour change (contrast's pivot is that
    mean after brightness, i.e. brightness * gray_mean). Saturation and hue keep gray pixels gray,
    which is why the pivot term passes through them unchanged.

    Returns:
        M (3x3), t0 (3,) and v (3,), float32.
    """
    inv_std = 1.0 / np.asarray(std, dtype=np.float64)
    mix = d.saturation * np.eye(3) + (1 - d.saturation) * _GREY
    if d.hue:
        a = 2 * math.pi * d.hue
        rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        mix = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ mix
    m = inv_std[:, None] * mix * (d.contrast * d.brightness)
    t0 = -np.asarray(mean) * inv_std
    v = (1 - d.contrast) * d.brightness * inv_std
    return m.astype(np.float32), t0.astype(np.float32), v.astype(np.float32)
