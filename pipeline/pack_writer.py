"""`senet pack`: writing a data tree as tar shards plus an index (read back by `pipeline.pack_reader`).

On a cluster's shared file system a training sample as one file costs one open (a metadata-server
round trip) per sample: 32 GPUs at 3,000 images/s each ask for ~100,000 opens per second. A pack
holds the same bytes in ~256 MB tar shards (the webdataset layout: `<key>.jpg` + `<key>.cls`, readable
by `tar`, Python's `tarfile`, DALI's `readers.webdataset` and the webdataset library), and an index
that says where each sample is. A reader opens each shard once per process and `pread`s samples at
their offsets: opens per epoch = O(shards), not O(samples), and the global class-aware order, every
augmentation draw and exact resume stay what they are for the tree the pack was made from. The
layout of a pack: `pipeline.pack_reader`.

Samples keep their bytes unless `--max-side` asks to re-encode larger images (fewer bytes to decode,
as FFCV does). Files that do not decode are reported as check-data reports them, left out of the
shards and listed in the index (flag BAD) and in pack.json, so the loaders exclude them and `senet
predict` still writes a line for every image. A pack interrupted half way continues where it
stopped: a shard with its .json beside it (and the size it records) is not written again.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pipeline.check import inspect_bytes
from pipeline.dali import image_size
from pipeline.datasets import index_file_list, index_train, index_val, list_images
from pipeline.devkit import DEVKIT_DIRNAME, find_devkit, load_devkit
from pipeline.errors import DataError
from pipeline.pack_reader import BAD, INDEX_DTYPE, PACK_FILE, PACK_FORMAT, REENCODED, SHARD_NAME, SPLITS, file_crc32, is_pack

@dataclass(frozen=True)
class PackSpec:
    """How to pack: shard size in bytes, optional re-encoding of images larger than `max_side`."""

    shard_bytes: int = 256 << 20
    max_side: int | None = None
    quality: int = 90
    workers: int = 1

    def __post_init__(self) -> None:
        if self.shard_bytes < 16 << 10:
            raise ValueError(f"--shard-size {self.shard_bytes} bytes: use at least 16KB (256MB suits a cluster)")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"--max-side {self.max_side}: use at least 16 pixels")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality {self.quality}: use 1..100")


@dataclass(frozen=True)
class _ShardJob:
    root: str
    out: str
    shard: int
    keys: tuple[int, ...]  # sample numbers within the split
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    max_side: int | None
    quality: int


def pack(root: str | Path, out: str | Path, splits: Iterable[str] = SPLITS, spec: PackSpec = PackSpec(),
         file_list: str | None = None, progress: Callable[[Iterator, int], Iterator] = lambda it, total: it
         ) -> dict[str, Any]:
    """Pack `root` (an ILSVRC tree, a folder of class folders, or a file list's root) into `out`.

    Args:
        root: the data root.
        out: the pack's folder (created; an interrupted pack there is continued).
        splits: which of train, val, test (those the root has).
        spec: shard size, re-encoding, workers.
        file_list: a `relative/path label` list under `root` for the train split, instead of a tree.
        progress: wraps the iterator of finished shards, given the number of samples.

    Returns:
        The manifest written to OUT/pack.json.
    """
    root, out = Path(root), Path(out)
    if is_pack(root):
        raise DataError(f"{root} is a pack already")
    out.mkdir(parents=True, exist_ok=True)
    train = index_file_list(root / file_list, root) if file_list else index_train(root)
    manifest: dict[str, Any] = {"format": PACK_FORMAT, "source": str(root.resolve()), "classes": list(train.classes),
                                "shard_bytes": spec.shard_bytes, "max_side": spec.max_side, "quality": spec.quality,
                                "splits": {}}
    devkit = None
    try:
        devkit = load_devkit(find_devkit(root))
    except DataError:
        pass
    if devkit is not None:
        shutil.copytree(devkit.path, out / DEVKIT_DIRNAME, dirs_exist_ok=True)
    wanted: dict[str, tuple[Sequence[str], np.ndarray]] = {}
    for split in splits:
        if split == "train":
            wanted[split] = (train.files, train.labels)
        elif (root / split).is_dir():
            if split == "val" and devkit is not None:
                val = index_val(root, devkit, train.classes)
                wanted[split] = (val.files, val.labels)
            else:
                names = list_images(root / split)
                wanted[split] = ([f"{split}/{n}" for n in names], np.full(len(names), -1, np.int64))
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, spec.workers)) as pool:
        for split, (files, labels) in wanted.items():
            manifest["splits"][split] = _pack_split(pool, root, out, split, files, labels, spec, progress)
    manifest["seconds"] = round(time.monotonic() - started, 1)
    tmp = out / f"{PACK_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / PACK_FILE)  # last: a folder with pack.json is a complete pack
    return manifest


class _Rows(list):
    """A finished shard's rows (its length is what a progress bar counts), with the shard's result."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result["rows"])
        self.result = result


def _pack_split(pool: ProcessPoolExecutor, root: Path, out: Path, split: str, files: Sequence[str],
                labels: np.ndarray, spec: PackSpec, progress: Callable[[Iterator, int], Iterator]) -> dict[str, Any]:
    """Write one split's shards (in parallel), then its index; returns its manifest entry."""
    (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [_ShardJob(str(root), str(out / split), n, tuple(keys), tuple(files[k] for k in keys),
                      tuple(int(labels[k]) for k in keys), spec.max_side, spec.quality)
            for n, keys in enumerate(_plan_shards(root, files, spec.shard_bytes))]
    index = np.zeros(len(files), INDEX_DTYPE)
    shards, bad = [], []
    finished = progress((_Rows(r) for r in pool.map(_write_shard, jobs)), len(files))
    for job, rows in zip(jobs, finished):
        result = rows.result
        shards.append({"shard": job.shard, "bytes": result["bytes"], "crc32": result["crc32"],
                       "samples": len(job.keys)})
        for key, row in zip(job.keys, result["rows"]):
            index[key] = tuple(row[:8])
            if row[7] & BAD:
                bad.append({"path": files[key], "error": row[8]})
    (out / "index").mkdir(exist_ok=True)
    _save_npy(out / "index" / f"{split}.npy", index)
    width = max((len(f.encode()) for f in files), default=1)
    _save_npy(out / "index" / f"{split}.paths.npy", np.array([f.encode() for f in files], dtype=f"S{width}"))
    return {"samples": len(files), "shards": shards, "bad": bad,
            "labelled": bool((labels >= 0).all()) if len(labels) else False}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _plan_shards(root: Path, files: Sequence[str], shard_bytes: int) -> list[list[int]]:
    """Consecutive samples per shard, by their file sizes (a deterministic plan: a resumed pack agrees)."""
    plan: list[list[int]] = [[]]
    filled = 0
    for k, rel in enumerate(files):
        try:
            size = os.path.getsize(root / rel) + 1024  # + tar headers and padding
        except OSError:
            size = 1024
        if plan[-1] and filled + size > shard_bytes:
            plan.append([])
            filled = 0
        plan[-1].append(k)
        filled += size
    return [keys for keys in plan if keys]


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """One shard and its .json (rows: offset, size, shard, label, width, height, crc32, flags, error).

    A shard whose .json is there and agrees with the file's size is complete: it is not written again.
    """
    tar_path = Path(job.out) / SHARD_NAME.format(job.shard)
    rows_path = tar_path.with_suffix(".json")
    if rows_path.is_file() and tar_path.is_file():
        try:
            kept = json.loads(rows_path.read_text())
            if kept["bytes"] == tar_path.stat().st_size and len(kept["rows"]) == len(job.keys):
                return kept
        except (OSError, ValueError, KeyError):
            pass
    tmp = tar_path.with_name(tar_path.name + f".tmp{os.getpid()}")
    rows = []
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, rel, label in zip(job.keys, job.paths, job.labels):
            try:
                data = (Path(job.root) / rel).read_bytes()
            except OSError as e:
                rows.append([0, 0, -1, label, 0, 0, 0, BAD, f"cannot read: {e.strerror}"])
                continue
            status = inspect_bytes(rel, data)
            if status.error:
                rows.append([0, 0, -1, label, 0, 0, 0, BAD, status.error])
                continue
            flags = 0
            if job.max_side:
                data, flags = _maybe_reencode(data, job.max_side, job.quality)
            width, height = image_size(data) or (0, 0)
            offset = _add(tar, f"{key:09d}.jpg", data)
            _add(tar, f"{key:09d}.cls", f"{label}\n".encode())
            rows.append([offset, len(data), job.shard, label, width, height, zlib.crc32(data), flags, ""])
    crc, _ = file_crc32(tmp, fsync=True)
    tmp.replace(tar_path)
    result = {"bytes": tar_path.stat().st_size, "crc32": crc, "rows": rows}
    rows_tmp = rows_path.with_name(rows_path.name + f".tmp{os.getpid()}")
    rows_tmp.write_text(json.dumps(result))
    rows_tmp.replace(rows_path)
    return result


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member; returns the byte offset of its data in the shard."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return offset


def _maybe_reencode(data: bytes, max_side: int, quality: int) -> tuple[bytes, int]:
    """The image re-encoded with its longer side at `max_side` when it is larger, else the bytes as they are."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if max(w, h) <= max_side:
            return data, 0
        scale = max_side / max(w, h)
        small = img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), REENCODED
