"""`senet make-synthetic`: a small, learnable data set in the exact ILSVRC2012 layout.

A class is a motif (a shape) and a background texture, at LARGE scale, because training crops are
small and random: RandomResizedCrop keeps 8-100 % of the area and the network sees it at 48-224 px.
So the motif is drawn on a jittered grid covering the whole image, 3 to 4 motifs per short side (a
motif is about a sixth of the short side across): any crop of 8 % of the area holds about one motif,
and the whole image squeezed into 48 px still shows each motif some 8 px across. The background's
texture has a period of about a fifth of the short side, never a few pixels that downscaling erases.
Colours are random per image (colour jitter cannot erase the class, colour alone cannot reveal it),
and each image carries clutter: lines and blobs of random colours at random places. Every feature
survives a mirror flip and a +-10 degree rotation (no class differs from another by handedness or a
small tilt). Beyond the first 40 classes the motifs are drawn as outlines (thick ones, that survive
downscaling).

The devkit is written like the real one: leaf ILSVRC2012_IDs 1..K are assigned in a shuffled WNID
order, and non-leaf synsets with IDs above K group the leaves.
"""
from __future__ import annotations

import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline.devkit import DEVKIT_DIRNAME, Synset, write_devkit
from pipeline.errors import DataError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "horizontal bar", "vertical bar")
# Textures that survive flips, +-10 degree tilts and the zoom of random-size crops (none differs from another by scale).
BACKGROUNDS = ("plain", "horizontal stripes", "vertical stripes", "checkerboard", "dots")
FILLS = ("solid", "outlined")
MAX_CLASSES = len(SHAPES) * len(BACKGROUNDS) * len(FILLS)
MOTIFS_PER_SIDE = (3.2, 4.2)  # grid cells along the short side: a motif every 24-31 % of it
MOTIF_DIAMETER = (0.55, 0.7)  # of the grid cell
TEXTURE_PERIOD = (4.5, 6.0)  # periods along the short side
CLUTTER = (3, 7)  # random lines and blobs per image
PATTERN_CONTRAST = (90, 130)  # grey levels between background and its texture: a texture as clear as the motifs
# Kinds of planted files: the first two are undecodable (to be reported and excluded), the rest are
# odd but valid, as in real ImageNet train (CMYK JPEGs, one PNG named .JPEG, grayscale images).
CORRUPT_KINDS = ("truncated", "zero_bytes", "png_as_jpeg", "cmyk", "grayscale")
UNDECODABLE_KINDS = ("truncated", "zero_bytes")
JPEG_QUALITY = 90  # ImageNet's own files are mostly quality 75-96
MANIFEST = "synthetic.json"


@dataclass(frozen=True)
class ClassLook:
    """What makes a class: independent of colour, flips, small rotations and the crop's zoom."""

    shape: str
    background: str
    fill: str = "solid"

    @property
    def words(self) -> str:
        return f"{self.fill} {self.shape} on {self.background}"


@dataclass(frozen=True)
class SyntheticSpec:
    """The options of `senet make-synthetic`, validated."""

    classes: int = 10
    train_per_class: int = 100
    val_per_class: int = 20
    test: int = 100
    imbalance: float = 1.0
    corrupt: int = 0
    seed: int = 0
    min_side: int = 200
    max_side: int = 500

    def __post_init__(self) -> None:
        checks = {
            "--classes": (self.classes, 2, MAX_CLASSES),
            "--train-per-class": (self.train_per_class, 1, 100_000),
            "--val-per-class": (self.val_per_class, 0, 100_000),
            "--test": (self.test, 0, 1_000_000),
            "--corrupt": (self.corrupt, 0, 10_000),
            "--seed": (self.seed, 0, 2**63 - 1),
        }
        for flag, (value, lo, hi) in checks.items():
            if not lo <= value <= hi:
                raise ValueError(f"{flag} {value} is out of range {lo}..{hi}")
        if not 1.0 <= self.imbalance <= self.train_per_class:
            raise ValueError(f"--imbalance {self.imbalance} must be between 1 and --train-per-class ({self.train_per_class})")


def class_looks(n: int) -> list[ClassLook]:
    """The first n looks, the most distinct first.

    The k-th solid look pairs shape k % 8 with background k % 5 (8 and 5 are coprime, so the 40 pairs
    are all distinct): the first five looks differ in background and shape, the first eight in shape.
    Outlined looks follow the 40 solid ones.
    """
    pairs = [(SHAPES[k % len(SHAPES)], BACKGROUNDS[k % len(BACKGROUNDS)]) for k in range(len(SHAPES) * len(BACKGROUNDS))]
    return [ClassLook(shape, bg, fill) for fill in FILLS for shape, bg in pairs][:n]


def render(look: ClassLook, rng: np.random.Generator, min_side: int = 200, max_side: int = 500) -> Image.Image:
    """One RGB image of a class, with random size, colours, motif placement, clutter and noise."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    bg, fg, pattern = _palette(rng)
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    _draw_background(draw, look.background, w, h, pattern, side / rng.uniform(*TEXTURE_PERIOD), rng)
    for _ in range(int(rng.integers(*CLUTTER, endpoint=True))):
        _draw_clutter(draw, w, h, side, rng)
    cell = side / rng.uniform(*MOTIFS_PER_SIDE)
    x0, y0 = rng.uniform(0, cell, size=2)
    for gy in np.arange(y0 - cell, h + cell, cell):
        for gx in np.arange(x0 - cell, w + cell, cell):
            r = cell * rng.uniform(*MOTIF_DIAMETER) / 2
            cx, cy = gx + rng.uniform(-0.12, 0.12) * cell, gy + rng.uniform(-0.12, 0.12) * cell
            _draw_shape(draw, look.shape, cx, cy, r, fg, look.fill == "outlined")
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(h, w, 3))  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _palette(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Background, foreground and pattern colours, the foreground well apart in lightness."""
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(int(bg.mean()) - int(fg.mean())) > 70:
            break
    pattern = np.clip(bg + rng.choice([-1, 1]) * rng.integers(*PATTERN_CONTRAST), 0, 255)
    return tuple(map(int, bg)), tuple(map(int, fg)), tuple(map(int, pattern))


def _draw_background(draw: ImageDraw.ImageDraw, kind: str, w: int, h: int, color: tuple, period: float,
                     rng: np.random.Generator) -> None:
    period = max(8, int(period))
    half = period // 2
    offset = int(rng.integers(period))
    if kind == "horizontal stripes":
        for y in range(offset - period, h, period):
            draw.rectangle([0, y, w, y + half - 1], fill=color)
    elif kind == "vertical stripes":
        for x in range(offset - period, w, period):
            draw.rectangle([x, 0, x + half - 1, h], fill=color)
    elif kind == "checkerboard":
        for row, y in enumerate(range(offset - period, h, half)):
            for x in range(offset - period + row % 2 * half, w, period):
                draw.rectangle([x, y, x + half - 1, y + half - 1], fill=color)
    elif kind == "dots":
        rad = period // 4
        for y in range(offset - half, h + period, period):
            for x in range(offset - half, w + period, period):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=color)


def _draw_clutter(draw: ImageDraw.ImageDraw, w: int, h: int, side: int, rng: np.random.Generator) -> None:
    """A line or a blob of a random colour somewhere: something to ignore."""
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    size = side * rng.uniform(0.04, 0.12)
    if rng.random() < 0.5:
        angle = rng.uniform(0, math.pi)
        draw.line([(x, y), (x + 2.5 * size * math.cos(angle), y + 2.5 * size * math.sin(angle))], fill=color,
                  width=max(2, int(size / 5)))
    else:
        draw.ellipse([x - size / 2, y - size / 3, x + size / 2, y + size / 3], fill=color)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple, outlined: bool) -> None:
    width = max(2, int(r / 3))  # thick outlines: they must survive a 4-8x downscale
    fill, outline = (None, color) if outlined else (color, None)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill, outline=outline, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(3, int(r / 2.5)))
        if not outlined:
            draw.ellipse([cx - r / 5, cy - r / 5, cx + r / 5, cy + r / 5], fill=color)
    elif shape in ("triangle", "diamond", "cross", "horizontal bar", "vertical bar"):
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill, outline=outline, width=width)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        t = r / 3
        pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
        return [(cx + x, cy + y) for x, y in pts]
    hw, hh = (r, r / 3) if shape == "horizontal bar" else (r / 3, r)
    return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]


def encode(img: Image.Image, kind: str = "jpeg") -> bytes:
    """File bytes for an image: a normal JPEG, or one of the planted CORRUPT_KINDS."""
    buf = io.BytesIO()
    if kind == "png_as_jpeg":
        img.save(buf, format="PNG")
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif kind == "grayscale":
        img.convert("L").save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif kind in ("jpeg", "truncated"):
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif kind != "zero_bytes":
        raise ValueError(f"unknown file kind {kind!r}; use 'jpeg' or one of {CORRUPT_KINDS}")
    data = buf.getvalue()
    return data[: len(data) * 3 // 5] if kind == "truncated" else data  # cut inside the entropy-coded scan


@dataclass(frozen=True)
class _Job:
    path: str
    look: ClassLook
    seed: tuple[int, ...]
    kind: str
    min_side: int
    max_side: int


def _write(job: _Job) -> None:
    img = render(job.look, np.random.default_rng(job.seed), job.min_side, job.max_side)
    Path(job.path).write_bytes(encode(img, job.kind))


def make_synthetic(out: str | Path, spec: SyntheticSpec, workers: int = 2,
                   progress: Callable[[Iterator], Iterator] = lambda it: it) -> dict:
    """Write the data set to `out` and return its manifest (also saved as `out/synthetic.json`).

    Args:
        out: the new data root; must not contain a data set already.
        spec: what to generate.
        workers: processes rendering images.
        progress: wraps the iterator of finished images (a progress bar).
    """
    out = Path(out)
    if (out / "train").exists() or (out / DEVKIT_DIRNAME).exists():
        raise DataError(f"{out}: already holds a data set; choose an empty folder")
    rng = np.random.default_rng([spec.seed, 0])
    looks = class_looks(spec.classes)
    wnids = sorted(f"n{v:08d}" for v in rng.choice(10**8, size=spec.classes, replace=False))
    wnid_look = dict(zip(wnids, rng.permutation(np.array(looks, dtype=object)).tolist()))
    ids = _shuffled_ids(len(wnids), rng)
    counts = _class_sizes(spec, rng)

    jobs: list[_Job] = []
    planted: list[dict] = []
    sizes = (spec.min_side, spec.max_side)
    for c, wnid in enumerate(wnids):
        (out / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for n in range(counts[c]):
            jobs.append(_Job(str(out / "train" / wnid / f"{wnid}_{n + 1}.JPEG"), wnid_look[wnid], (spec.seed, 1, c, n), "jpeg", *sizes))
    for k in range(spec.corrupt):  # extra files in random classes, named like their neighbours
        kind = CORRUPT_KINDS[k % len(CORRUPT_KINDS)]
        c = int(rng.integers(spec.classes))
        counts[c] += 1
        rel = f"train/{wnids[c]}/{wnids[c]}_{counts[c]}.JPEG"
        jobs.append(_Job(str(out / rel), wnid_look[wnids[c]], (spec.seed, 2, k), kind, *sizes))
        planted.append({"path": rel, "kind": kind, "decodable": kind not in UNDECODABLE_KINDS})

    val_labels = rng.permutation(np.repeat(np.arange(spec.classes), spec.val_per_class))
    test_labels = rng.integers(spec.classes, size=spec.test)
    for split, labels in (("val", val_labels), ("test", test_labels)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for n, c in enumerate(labels.tolist()):
            path = out / split / f"ILSVRC2012_{split}_{n + 1:08d}.JPEG"
            jobs.append(_Job(str(path), wnid_look[wnids[c]], (spec.seed, 3 if split == "val" else 4, n), "jpeg", *sizes))

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in progress(pool.map(_write, jobs, chunksize=16)):
            pass

    synsets = _synsets(wnids, ids, wnid_look, counts)
    write_devkit(out / DEVKIT_DIRNAME, synsets, [int(ids[c]) for c in val_labels])
    (out / "test_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for c in test_labels))
    manifest = {
        "spec": asdict(spec),
        "classes": [{"wnid": w, "ilsvrc_id": int(ids[c]), "train_images": int(counts[c]), "words": wnid_look[w].words}
                    for c, w in enumerate(wnids)],
        "planted": planted,
        "val_images": int(len(val_labels)),
        "test_images": int(len(test_labels)),
        "note": "test_ground_truth.txt holds the test labels (ILSVRC2012_IDs); real ImageNet withholds them",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _shuffled_ids(k: int, rng: np.random.Generator) -> np.ndarray:
    """ILSVRC2012_ID of each sorted-WNID class: a permutation of 1..k that is never the identity."""
    ids = rng.permutation(k) + 1
    if np.array_equal(ids, np.arange(1, k + 1)):  # the trap must exist: sorted order != ID order
        ids[[0, 1]] = ids[[1, 0]]
    return ids


def _class_sizes(spec: SyntheticSpec, rng: np.random.Generator) -> list[int]:
    """Geometric long tail: the largest class `imbalance` times the smallest, in random class order."""
    k = spec.classes
    rank = rng.permutation(k)
    return [max(1, round(spec.train_per_class * spec.imbalance ** (-r / max(1, k - 1)))) for r in rank]


def _synsets(wnids: list[str], ids: np.ndarray, looks: dict[str, ClassLook], counts: list[int]) -> list[Synset]:
    """Leaves with IDs 1..K, then one parent per shape and a root, with IDs above K (as in the real devkit)."""
    k = len(wnids)
    leaves = [Synset(int(ids[c]), w, looks[w].words, f"synthetic class: {looks[w].words}", (), 0, counts[c])
              for c, w in enumerate(wnids)]
    shapes = sorted({looks[w].shape for w in wnids})
    parents = []
    for j, shape in enumerate(shapes):
        kids = tuple(sorted(int(ids[c]) for c, w in enumerate(wnids) if looks[w].shape == shape))
        n = sum(counts[c] for c, w in enumerate(wnids) if looks[w].shape == shape)
        parents.append(Synset(k + 1 + j, f"n9{j:07d}", f"{shape} things", f"every class drawn with a {shape}", kids, 1, n))
    root = Synset(k + 1 + len(parents), "n99999999", "entity", "everything", tuple(p.ilsvrc_id for p in parents), 2, sum(counts))
    return sorted(leaves, key=lambda s: s.ilsvrc_id) + parents + [root]
