"""Training augmentation as numbers: the spec, and each sample's parameters drawn on the host.

Every random choice for a sample is a pure function of (seed, epoch, position), where `position` is
the sample's GLOBAL position in the epoch's order (see pipeline.sampling). So what a sample receives
does not depend on the world size, on how far DALI prefetches, or on where a run was resumed; a
resumed run needs only (epoch, position). The uniforms come from a counter-based generator
(`uniforms`: the splitmix64 output function over a key made of seed and epoch and a counter made of
position and draw number), computed for a whole batch in a few numpy operations: a batch of 256
costs about as much host time as ONE `np.random.default_rng(...)` seeding did per sample.

The draws are turned into arguments for ONE resampling pass (pipeline.dali) and ONE colour pass
(pipeline.loader.apply_colour), again for a whole batch at once:

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

`draw`, `warp_geometry` and `colour_transform` are the one-sample views of `draws`,
`warp_geometries` and `colour_transforms`: the same code, so a sample gets the same numbers alone or
in any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# ImageNet statistics on the 0-255 scale, RGB.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's and torchvision's grayscale
CROP_TRIES = 10  # RandomResizedCrop's attempts before falling back to a centre crop
# A bilinear warp aliases when it shrinks by more than ~2x (it reads 2x2 pixels per output pixel);
# such regions are first resized with an antialiasing filter so that the warp shrinks by <= 1.5x.
ALIAS_FREE_SHRINK = 2.0
PRESCALE_SHRINK = 1.5
UNIFORMS = 4 * CROP_TRIES + 6  # uniforms drawn per sample: crop tries, flip, angle, 4 colour factors
# YIQ <-> RGB, for the hue rotation (DALI's and torchvision-like hue shifts rotate chroma this way).
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_GREY = np.outer(np.ones(3), LUMA)  # rgb -> (luma, luma, luma)
# splitmix64 (Steele, Lea, Flood 2014): the Weyl increment and the output mix's multipliers.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


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


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (a bijection with full avalanche)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, positions: ArrayLike, count: int = UNIFORMS) -> np.ndarray:
    """`count` uniforms in [0, 1) for each global position: a pure function of (seed, epoch, position).

    Counter-based: draw j of position p is splitmix64's output for counter ``p * count + j + 1`` in the
    stream keyed by (seed, epoch), so any subset of positions is computed directly, in any order.

    Returns:
        float64 array of shape (len(positions), count).
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        key = _mix64(np.array([seed], np.uint64) * _GOLDEN + _GOLDEN)
        key = _mix64(key ^ (np.array([epoch], np.uint64) * _MIX1 + _GOLDEN))
        counters = np.asarray(positions, np.uint64)[:, None] * np.uint64(count) + np.arange(1, count + 1, dtype=np.uint64)
        bits = _mix64(key + counters * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


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


@dataclass(frozen=True)
class Draws:
    """The augmentation of a batch, one array per `Draw` field (crop boxes int64, flip bool, the rest float64)."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    flip: np.ndarray
    angle: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Draw:
        return Draw(*(t(getattr(self, f.name)[i]) for f, t in zip(fields(Draw), (int,) * 4 + (bool,) + (float,) * 5)))


def draws(spec: AugmentSpec, seed: int, epoch: int, positions: ArrayLike, widths: ArrayLike,
          heights: ArrayLike) -> Draws:
    """The augmentation of the samples at global `positions` of `epoch`, for images of widths x heights.

    A pure function per sample: the same (seed, epoch, position, size) gives the same draw in any
    process and in any batch. A fixed number of uniforms is drawn whatever happens, so adding a try
    never shifts the later draws.
    """
    widths, heights = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    u = uniforms(seed, epoch, positions)
    x, y, w, h = _crop_boxes(spec, u[:, :4 * CROP_TRIES], widths, heights)
    flip, angle, b, c, s, hue = u[:, 4 * CROP_TRIES:].T
    return Draws(x, y, w, h, flip < spec.flip, (2 * angle - 1) * spec.rotation, _factor(b, spec.brightness),
                 _factor(c, spec.contrast), _factor(s, spec.saturation), (2 * hue - 1) * spec.hue)


def draw(spec: AugmentSpec, seed: int, epoch: int, position: int, width: int, height: int) -> Draw:
    """`draws` for one sample."""
    return draws(spec, seed, epoch, [position], [width], [height])[0]


def _factor(u: np.ndarray, jitter: float) -> np.ndarray:
    """Colour factors uniform in [max(0, 1 - jitter), 1 + jitter] (torchvision's range)."""
    lo = max(0.0, 1.0 - jitter)
    return lo + u * (1.0 + jitter - lo)


def _crop_boxes(spec: AugmentSpec, u: np.ndarray, width: np.ndarray,
                height: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop's boxes (x, y, w, h): the first of the area and log-aspect tries that fits, else a
    centre crop at the nearest allowed aspect."""
    t = CROP_TRIES
    area = (width * height)[:, None].astype(np.float64)
    lo, hi = math.log(spec.min_aspect), math.log(spec.max_aspect)
    target = area * (spec.min_area + u[:, :t] * (spec.max_area - spec.min_area))
    aspect = np.exp(lo + u[:, t:2 * t] * (hi - lo))
    cw, ch = np.rint(np.sqrt(target * aspect)).astype(np.int64), np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (cw > 0) & (cw <= width[:, None]) & (ch > 0) & (ch <= height[:, None])
    first, rows = fits.argmax(axis=1), np.arange(len(width))
    w, h = cw[rows, first], ch[rows, first]
    x = np.minimum(np.floor(u[rows, 2 * t + first] * (width - w + 1)).astype(np.int64), width - w)
    y = np.minimum(np.floor(u[rows, 3 * t + first] * (height - h + 1)).astype(np.int64), height - h)
    none = ~fits.any(axis=1)
    if none.any():
        ww, hh = width[none], height[none]
        ratio = ww / hh
        fw = np.where(ratio > spec.max_aspect, np.minimum(ww, np.rint(hh * spec.max_aspect).astype(np.int64)), ww)
        fh = np.where(ratio < spec.min_aspect, np.minimum(hh, np.rint(ww / spec.min_aspect).astype(np.int64)), hh)
        w[none], h[none], x[none], y[none] = fw, fh, (ww - fw) // 2, (hh - fh) // 2
    return x, y, w, h


def warp_geometries(d: Draws, widths: ArrayLike, heights: ArrayLike, out_size: int) -> dict[str, np.ndarray]:
    """The region to decode, an optional antialiased pre-resize of it, and the warp matrix, per sample.

    Returns:
        anchor (B, 2: y, x) and shape (B, 2: h, w) of the region, int32, inside the image; prescale
        (B,) bool and pre_size (B, 2: h, w) float32, the region's size after the pre-resize (its own
        size when none); matrix (B, 2, 3) float32: DALI warp_affine's destination-to-source matrix
        (continuous coordinates, [0, 0] = the first pixel's corner) into the (pre-resized) region.
        Flip, scale and rotation are all in it.
    """
    width, height = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    a = np.radians(d.angle)
    cos, sin = np.cos(a), np.sin(a)
    fw = np.where(d.flip, -d.w, d.w) / out_size
    fh = d.h / out_size
    # Output offsets from the centre, scaled to crop pixels (mirrored when flipped) and turned so that
    # the content turns counter-clockwise by `angle` on screen (y points down): src = lin @ out + off.
    l00, l01, l10, l11 = cos * fw, -sin * fh, sin * fw, cos * fh
    cx, cy, half = d.x + d.w / 2, d.y + d.h / 2, out_size / 2
    reach_x = (np.abs(l00) + np.abs(l01)) * half  # the rotated crop's bounding box, around its centre
    reach_y = (np.abs(l10) + np.abs(l11)) * half
    x0 = np.maximum(0, np.floor(cx - reach_x).astype(np.int64) - 1)  # one pixel of margin for bilinear taps
    y0 = np.maximum(0, np.floor(cy - reach_y).astype(np.int64) - 1)
    x1 = np.minimum(width, np.ceil(cx + reach_x).astype(np.int64) + 1)
    y1 = np.minimum(height, np.ceil(cy + reach_y).astype(np.int64) + 1)
    rw, rh = x1 - x0, y1 - y0
    matrix = np.stack([np.stack([l00, l01, cx - x0 - (l00 + l01) * half], axis=1),
                       np.stack([l10, l11, cy - y0 - (l10 + l11) * half], axis=1)], axis=1)
    shrink = np.maximum(d.w, d.h) / out_size
    prescale = shrink > ALIAS_FREE_SHRINK
    pre_w = np.where(prescale, np.maximum(1.0, np.rint(rw * PRESCALE_SHRINK / shrink)), rw)
    pre_h = np.where(prescale, np.maximum(1.0, np.rint(rh * PRESCALE_SHRINK / shrink)), rh)
    matrix[:, 0] *= (pre_w / rw)[:, None]
    matrix[:, 1] *= (pre_h / rh)[:, None]
    return {"anchor": np.stack([y0, x0], axis=1).astype(np.int32), "shape": np.stack([rh, rw], axis=1).astype(np.int32),
            "prescale": prescale, "pre_size": np.stack([pre_h, pre_w], axis=1).astype(np.float32),
            "matrix": matrix.astype(np.float32)}


def warp_geometry(d: Draw, width: int, height: int, out_size: int) -> dict[str, np.ndarray]:
    """`warp_geometries` for one sample (the arrays without the batch axis)."""
    batch = Draws(*(np.array([getattr(d, f.name)]) for f in fields(Draw)))
    return {k: v[0] for k, v in warp_geometries(batch, [width], [height], out_size).items()}


def colour_transforms(d: Draws, mean: ArrayLike = IMAGENET_MEAN,
                      std: ArrayLike = IMAGENET_STD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brightness, contrast, saturation, hue and normalisation as ``M @ rgb + t0 + v * gray_mean``.

    gray_mean is the luma mean of the image before any colour change (contrast's pivot is that
    mean after brightness, i.e. brightness * gray_mean). Saturation and hue keep gray pixels gray,
    which is why the pivot term passes through them unchanged.

    Returns:
        M (B, 3, 3), t0 (B, 3) and v (B, 3), float32.
    """
    inv_std = 1.0 / np.asarray(std, dtype=np.float64)
    s = d.saturation[:, None, None]
    mix = s * np.eye(3) + (1 - s) * _GREY
    turned = d.hue != 0
    if turned.any():
        a = 2 * math.pi * d.hue[turned]
        rot = np.zeros((len(a), 3, 3))
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1.0, np.cos(a), np.cos(a)
        rot[:, 1, 2], rot[:, 2, 1] = -np.sin(a), np.sin(a)
        mix[turned] = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ mix[turned]
    m = inv_std[None, :, None] * mix * (d.contrast * d.brightness)[:, None, None]
    t0 = np.broadcast_to(-np.asarray(mean) * inv_std, (len(d), 3))
    v = ((1 - d.contrast) * d.brightness)[:, None] * inv_std[None, :]
    return m.astype(np.float32), t0.astype(np.float32), v.astype(np.float32)


def colour_transform(d: Draw, mean: ArrayLike = IMAGENET_MEAN,
                     std: ArrayLike = IMAGENET_STD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`colour_transforms` for one sample: M (3, 3), t0 (3,), v (3,)."""
    batch = Draws(*(np.array([getattr(d, f.name)]) for f in fields(Draw)))
    m, t0, v = colour_transforms(batch, mean, std)
    return m[0], t0[0], v[0]


def colour_params(d: Draws, mean: ArrayLike = IMAGENET_MEAN, std: ArrayLike = IMAGENET_STD) -> np.ndarray:
    """`colour_transforms` packed as float32 (B, 3, 5) arrays [M | t0 | v], as the loader's colour pass reads them."""
    m, t0, v = colour_transforms(d, mean, std)
    return np.concatenate([m, t0[:, :, None], v[:, :, None]], axis=2)
