"""Index image files: an ILSVRC2012 tree, a folder of class folders, or a file list.

Class indices follow the sorted WNID (folder) order, as DALI's `file_root` and ImageFolder do; the
devkit's ILSVRC2012_IDs are a different numbering (see `pipeline.devkit`). Scanning 1.28 M files takes
minutes on network storage, so the train index is cached under `cache_dir`, keyed on the tree's path
and invalidated by the modification times of the tree's folders (adding, removing or renaming a file
changes its folder's mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.devkit import Devkit
from pipeline.errors import DataError
from pipeline.pack_reader import PackedSamples, PathsView, bad_paths, is_pack, load_index, read_manifest

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INDEX_FORMAT = 1
# Where the file index and the exclusion list of each data tree are kept (data sets are often read-only).
DEFAULT_CACHE_DIR = "~/.cache/senet"


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """Images (paths relative to `root`) with their class index into `classes` (WNIDs, sorted).

    The images are files under `root`, or, for a pack (`pipeline.pack_reader`), the samples of its shards:
    `samples` reads them by offset, and `files` are their original paths.
    """

    root: Path
    files: Sequence[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    samples: Any = None  # pipeline.pack_reader.PackedSamples for a pack, else None

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        """Where image i is, or came from (a pack's sample: its original path, for messages)."""
        return self.root / self.files[i]

    def read(self, i: int) -> bytes:
        """The bytes of image i."""
        return self.samples.read(i) if self.samples is not None else self.path(i).read_bytes()

    def class_counts(self) -> np.ndarray:
        """Images per class, indexed like `classes`."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def without(self, excluded: Iterable[str]) -> ImageIndex:
        """The same index less the files named (root-relative paths), e.g. check-data's exclusion list."""
        excluded = set(excluded)
        if not excluded:
            return self
        if self.samples is not None:  # a pack's paths: vectorised, nothing decoded per image
            keep = self.files.keep(excluded)
            return ImageIndex(self.root, self.files.subset(keep), self.labels[keep], self.classes,
                              self.samples.subset(keep))
        keep = [i for i, f in enumerate(self.files) if f not in excluded]
        return ImageIndex(self.root, tuple(self.files[i] for i in keep), self.labels[keep], self.classes)


def train_folder(root: str | Path) -> Path:
    """`root/train` for an ILSVRC root, else `root` itself (a folder of class folders)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    return root / "train" if (root / "train").is_dir() else root


def tree_cache_folder(root: str | Path, cache_dir: str | Path) -> Path:
    """Where the index and exclusion list of the tree at `root` live (trees are often read-only)."""
    root = Path(root).resolve()
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{root.name}-{key}"


def index_train(root: str | Path, cache_dir: str | Path | None = None) -> ImageIndex:
    """Index the training images of `root` (ILSVRC root or folder of class folders).

    Args:
        root: the data root; its `train/` is used when present.
        cache_dir: where to keep the index between runs; None scans every time.

    Returns:
        Files relative to `root`, labels by sorted WNID (a pack's train split when `root` is a pack).
    """
    root = Path(root)
    if is_pack(root):
        return pack_index(root, "train")
    folder = train_folder(root)
    class_dirs = sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    if not class_dirs:
        raise DataError(f"{folder}: no class folders (expected {folder}/<WNID>/*.JPEG)")
    fingerprint = _fingerprint(folder, class_dirs)
    cache_file = tree_cache_folder(root, cache_dir) / "index.json" if cache_dir is not None else None
    cached = _read_cache(cache_file, fingerprint) if cache_file else None
    if cached is None:
        cached = {e.name: sorted(f.name for f in os.scandir(e.path) if _is_image(f.name)) for e in class_dirs}
        if cache_file:
            _write_cache(cache_file, fingerprint, cached)
    prefix = os.path.relpath(folder, root)
    classes = tuple(sorted(cached))
    files, labels = [], []
    for label, wnid in enumerate(classes):
        base = wnid if prefix == "." else f"{prefix}/{wnid}"
        files.extend(f"{base}/{name}" for name in cached[wnid])
        labels.extend([label] * len(cached[wnid]))
    return ImageIndex(root, tuple(files), np.asarray(labels, dtype=np.int64), classes)


def index_file_list(list_file: str | Path, root: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """Index a list of `relative/path label` lines (labels are class indices, 0-based).

    `classes` names the class of each index when known; otherwise classes are named by their index.
    """
    list_file = Path(list_file)
    try:
        lines = list_file.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{list_file}: cannot read file list ({e.strerror})") from None
    files, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{list_file}: line {n}: expected 'relative/path label', got {line!r}")
        files.append(parts[0])
        labels.append(int(parts[1]))
    if not files:
        raise DataError(f"{list_file}: the file list names no images")
    labels_arr = np.asarray(labels, dtype=np.int64)
    num = int(labels_arr.max()) + 1
    if classes is None:
        classes = tuple(str(i) for i in range(num))
    elif num > len(classes):
        raise DataError(f"{list_file}: label {num - 1} but only {len(classes)} classes are known")
    return ImageIndex(Path(root), tuple(files), labels_arr, tuple(classes))


def index_val(root: str | Path, devkit: Devkit, classes: Sequence[str]) -> ImageIndex:
    """Index `root/val` (flat, ascending file names) with labels from the devkit's ground truth.

    Ground-truth ILSVRC2012_IDs are mapped to WNIDs and then to positions in `classes` (the
    training set's sorted WNIDs), so the labels share the model's numbering. A pack's val split
    carries the labels it was packed with (mapped the same way then).
    """
    if is_pack(root):
        index = pack_index(root, "val")
        if index.classes != tuple(classes):
            raise DataError(f"{root}: the pack's classes are not the training classes")
        return index
    files = list_images(Path(root) / "val")
    ids = devkit.validation_ground_truth()
    if len(ids) != len(files):
        raise DataError(f"{devkit.ground_truth_path()}: {len(ids)} labels for {len(files)} images in {Path(root) / 'val'}")
    position = {w: i for i, w in enumerate(classes)}
    wnid_of = devkit.wnids_by_id()
    missing = sorted({wnid_of[i] for i in ids.tolist()} - set(position))
    if missing:
        raise DataError(f"{devkit.ground_truth_path()}: val classes {missing[:5]} have no training folder")
    labels = np.array([position[wnid_of[i]] for i in ids.tolist()], dtype=np.int64)
    return ImageIndex(Path(root), tuple(f"val/{f}" for f in files), labels, tuple(classes))


def pack_index(pack_dir: str | Path, split: str, strip: int = 0) -> ImageIndex:
    """A split of a pack as an ImageIndex: memory-mapped records and paths, bad files included (see
    `load_exclusions`), in the order of the tree it was packed from. `strip` drops a path prefix
    (e.g. "test/" for prediction on PACK/test)."""
    manifest = read_manifest(pack_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{pack_dir}: the pack has no {split} split (it has {', '.join(manifest['splits'])})")
    index = load_index(pack_dir, split)
    return ImageIndex(Path(pack_dir), PathsView(pack_dir, split, strip=strip),
                      np.asarray(index["label"]), tuple(manifest["classes"]), PackedSamples(pack_dir, split))


def list_images(folder: str | Path) -> list[str]:
    """Image file names of a flat folder (val/ or test/), in ascending name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))


def read_exclusions(*files: str | Path | None) -> set[str]:
    """Root-relative paths listed in exclusion files (missing files are an error, None is skipped)."""
    out: set[str] = set()
    for f in files:
        if f is None:
            continue
        try:
            out.update(line.strip() for line in Path(f).expanduser().read_text().splitlines() if line.strip())
        except OSError as e:
            raise DataError(f"{f}: cannot read exclusion list ({e.strerror})") from None
    return out


def load_exclusions(root: str | Path, cache_dir: str | Path, exclude_file: str | Path | None = None) -> set[str]:
    """check-data's exclusion list for this tree (when it has run) plus `exclude_file`."""
    cached = tree_cache_folder(root, cache_dir) / "exclude.txt"
    listed = read_exclusions(cached if cached.is_file() else None, exclude_file)
    return listed | bad_paths(root) if is_pack(root) else listed  # a pack knows its own bad files


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _fingerprint(folder: Path, class_dirs: Sequence[os.DirEntry]) -> str:
    """Changes whenever a file is added, removed or renamed anywhere in the tree."""
    h = hashlib.sha1(f"{INDEX_FORMAT}:{folder.resolve()}:{folder.stat().st_mtime_ns}".encode())
    for e in class_dirs:
        h.update(f"{e.name}:{e.stat().st_mtime_ns};".encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> dict[str, list[str]] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data["classes"] if data.get("fingerprint") == fingerprint else None


def _write_cache(path: Path, fingerprint: str, classes: dict[str, list[str]]) -> None:
    """Atomic, and silent when the cache folder is not writable: the cache only saves time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "classes": classes}))
        tmp.replace(path)
    except OSError:
        pass
