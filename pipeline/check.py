"""`senet check-data`: a pre-flight scan of a data tree before hours of GPU time depend on it.

Every image is decoded (in parallel), so that a truncated file is found now rather than by the
DALI pipeline of a 64-GPU job, where it kills the pipeline. Undecodable files go to an exclusion
list that the loaders honour; odd but valid files (CMYK, grayscale, PNG named .JPEG) are listed.
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.datasets import DEFAULT_CACHE_DIR, ImageIndex, index_train, list_images, pack_index, tree_cache_folder
from pipeline.devkit import DEVKIT_DIRNAME, find_devkit, load_devkit
from pipeline.errors import DataError
from pipeline.pack_reader import BAD, SHARD_NAME, file_crc32, is_pack, read_manifest

EXCLUDE_FILE = "exclude.txt"
MIN_SIDE = 8  # smaller images cannot be cropped and resized meaningfully


@dataclass(frozen=True)
class FileStatus:
    """What decoding one file showed: `odd` names a valid oddity, `error` an undecodable file."""

    path: str
    odd: str | None = None
    error: str | None = None


def inspect_image(root: str, rel: str) -> FileStatus:
    """Decode one file fully (not just its header) and classify it."""
    try:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
    except OSError as e:
        return FileStatus(rel, error=f"cannot read: {e.strerror}")
    return inspect_bytes(rel, data)


def inspect_bytes(rel: str, data: bytes) -> FileStatus:
    """Decode one image's bytes fully (a truncated JPEG fails only at the end of its scan) and classify it."""
    if not data:
        return FileStatus(rel, error="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; only failures matter here
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode = img.format, img.mode
                img.load()  # decodes the whole scan: a truncated JPEG fails here, not at open()
                w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return FileStatus(rel, error=f"cannot decode: {e}")
    if min(w, h) < MIN_SIDE:
        return FileStatus(rel, error=f"too small ({w}x{h})")
    if fmt != "JPEG" and rel.lower().endswith((".jpeg", ".jpg")):
        return FileStatus(rel, odd=f"{fmt} file named .JPEG")
    if mode == "CMYK":
        return FileStatus(rel, odd="CMYK JPEG")
    if mode in ("L", "LA", "1", "I", "I;16"):
        return FileStatus(rel, odd="grayscale")
    return FileStatus(rel)


def _inspect_many(args: tuple[str, list[str]]) -> list[FileStatus]:
    root, rels = args
    return [inspect_image(root, r) for r in rels]


@dataclass
class CheckReport:
    """The outcome of a scan; `problems` are what would make training fail."""

    root: str
    devkit: str | None
    splits: dict[str, dict] = field(default_factory=dict)
    odd: list[dict] = field(default_factory=list)
    undecodable: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exclude_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.undecodable

    def as_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def check_data(root: str | Path, devkit: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
               exclude_out: str | Path | None = None, workers: int | None = None,
               progress: Callable[[Iterator, int], Iterator] = lambda it, total: it) -> CheckReport:
    """Scan a data tree: counts, decodability, devkit consistency; write the exclusion list.

    Args:
        root: an ILSVRC2012 root or a folder of class folders.
        devkit: the devkit folder (default ROOT/ILSVRC2012_devkit_t12 when it exists).
        cache_dir: the exclusion list is written to this tree's folder there (`data.cache_dir`).
        exclude_out: also write the exclusion list here.
        workers: decoding processes (default: all cores).
        progress: wraps the iterator of decoded chunks, given the total number of files.
    """
    root = Path(root)
    if is_pack(root):
        return _check_pack(root, cache_dir, exclude_out, workers or os.cpu_count() or 1, progress)
    train = index_train(root, cache_dir)
    report = CheckReport(str(root), None)
    report.splits["train"] = _class_stats(train)
    flat = {s: list_images(root / s) for s in ("val", "test") if (root / s).is_dir()}
    for split, names in flat.items():
        report.splits[split] = {"images": len(names)}
    _check_devkit(root, devkit, train, flat, report)

    files = list(train.files) + [f"{s}/{n}" for s, names in flat.items() for n in names]
    statuses = _decode_all(root, files, workers or os.cpu_count() or 1, progress)
    bad = {s.path for s in statuses if s.error}
    report.undecodable = [{"path": s.path, "error": s.error} for s in statuses if s.error]
    report.odd = [{"path": s.path, "kind": s.odd} for s in statuses if s.odd]
    _check_classes_after_exclusion(train, bad, report)

    _write_exclusions(report, root, bad, cache_dir, exclude_out)
    return report


def _write_exclusions(report: CheckReport, root: Path, bad: set[str], cache_dir: str | Path,
                      exclude_out: str | Path | None) -> None:
    text = "".join(f"{p}\n" for p in sorted(bad))
    targets = [tree_cache_folder(root, cache_dir) / EXCLUDE_FILE] + ([Path(exclude_out)] if exclude_out else [])
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            report.exclude_files.append(str(target))
        except OSError as e:
            raise DataError(f"{target}: cannot write the exclusion list ({e.strerror})") from None


def _check_pack(root: Path, cache_dir: str | Path, exclude_out: str | Path | None, workers: int,
                progress: Callable[[Iterator, int], Iterator]) -> CheckReport:
    """check-data of a pack: every shard's crc32 against the manifest, every sample decoded from its shard,
    the files found bad when packing listed as undecodable (they are in no shard)."""

    manifest = read_manifest(root)
    report = CheckReport(str(root), str(root / DEVKIT_DIRNAME) if (root / DEVKIT_DIRNAME).is_dir() else None)
    train = index_train(root)
    report.splits["train"] = _class_stats(train)
    jobs = []
    for split, info in manifest["splits"].items():
        if split != "train":
            report.splits[split] = {"images": info["samples"]}
        for shard in info["shards"]:
            path = root / split / SHARD_NAME.format(shard["shard"])
            if _crc32(path) != (shard["crc32"], shard["bytes"]):
                report.problems.append(f"{path}: damaged (its size or crc32 differs from pack.json); pack again")
        samples = train.samples if split == "train" else pack_index(root, split).samples
        good = np.flatnonzero((samples.index["flags"] & BAD) == 0).tolist()
        jobs += [(root, split, good[i:i + 64]) for i in range(0, len(good), 64)]
    statuses: list[FileStatus] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        total = sum(len(j[2]) for j in jobs)
        for done in progress(pool.map(_inspect_packed, jobs), total):
            statuses.extend(done)
    packed_bad = [b for info in manifest["splits"].values() for b in info.get("bad", [])]
    report.undecodable = [{"path": b["path"], "error": f"{b['error']} (left out when packed)"} for b in packed_bad]
    report.undecodable += [{"path": s.path, "error": s.error} for s in statuses if s.error]
    report.odd = [{"path": s.path, "kind": s.odd} for s in statuses if s.odd]
    bad = {u["path"] for u in report.undecodable}
    _check_classes_after_exclusion(train, bad, report)
    _write_exclusions(report, root, bad, cache_dir, exclude_out)
    return report


@functools.lru_cache(maxsize=None)
def _worker_pack_index(root: Path, split: str) -> ImageIndex:
    """One index per split and worker process, not one per chunk of samples."""
    return pack_index(root, split)


def _inspect_packed(job: tuple[Path, str, list[int]]) -> list[FileStatus]:
    root, split, positions = job
    index = _worker_pack_index(root, split)
    return [inspect_bytes(index.files[i], index.read(i)) for i in positions]


def _crc32(path: Path) -> tuple[int, int]:
    try:
        return file_crc32(path)
    except OSError:
        return -1, -1


def _class_stats(index: ImageIndex) -> dict:
    counts = index.class_counts()
    nonzero = counts[counts > 0]
    return {
        "images": int(len(index)),
        "classes": len(index.classes),
        "min_per_class": int(counts.min()),
        "max_per_class": int(counts.max()),
        "imbalance": float(nonzero.max() / nonzero.min()) if nonzero.size else None,
        "per_class": {w: int(c) for w, c in zip(index.classes, counts)},
    }


def _check_devkit(root: Path, devkit: str | Path | None, train: ImageIndex, flat: dict[str, list[str]],
                  report: CheckReport) -> None:
    if devkit is None and not (root / DEVKIT_DIRNAME).is_dir():
        if "val" in flat:
            report.warnings.append(f"no devkit ({root / DEVKIT_DIRNAME}): val labels and ILSVRC2012_IDs are unknown")
        return
    try:
        kit = load_devkit(find_devkit(root, devkit))
    except DataError as e:
        report.problems.append(str(e))
        return
    report.devkit = str(kit.path)
    leaves = {s.wnid for s in kit.leaves}
    unknown = [w for w in train.classes if w not in leaves]
    if unknown:
        report.problems.append(f"{len(unknown)} training folders are not devkit classes, e.g. {unknown[:3]}")
    absent = sorted(leaves - set(train.classes))
    if absent:
        report.problems.append(f"{len(absent)} devkit classes have no training folder, e.g. {absent[:3]}")
    if "val" in flat:
        try:
            truth = kit.validation_ground_truth()
        except DataError as e:
            report.problems.append(str(e))
            return
        if len(truth) != len(flat["val"]):
            report.problems.append(f"{kit.ground_truth_path()}: {len(truth)} labels for {len(flat['val'])} val images")


def _check_classes_after_exclusion(train: ImageIndex, bad: set[str], report: CheckReport) -> None:
    if not len(train):
        report.problems.append(f"{report.root}: no training images")
        return
    keep = np.array([f not in bad for f in train.files])
    counts = np.bincount(train.labels[keep], minlength=len(train.classes))
    empty = [w for w, c in zip(train.classes, counts) if c == 0]
    if empty:
        report.problems.append(f"{len(empty)} classes have no decodable training image, e.g. {empty[:3]}")


def _decode_all(root: Path, files: list[str], workers: int, progress: Callable) -> list[FileStatus]:
    chunk = 64  # large enough to amortise inter-process traffic, small enough for a live progress bar
    chunks = [(str(root), files[i:i + chunk]) for i in range(0, len(files), chunk)]
    out: list[FileStatus] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in progress(pool.map(_inspect_many, chunks), len(files)):
            out.extend(done)
    return out
