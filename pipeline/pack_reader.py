"""Reading a pack (what `senet pack` writes): its manifest, its memory-mapped index, samples by offset.

A pack holds a data tree's bytes in ~256 MB tar shards (the webdataset layout: `<key>.jpg` + `<key>.cls`)
and an index that says where each sample is. A reader opens each shard once per process and `pread`s
samples at their offsets: opens per epoch = O(shards), not O(samples). How a pack is made and why:
`pipeline.pack_writer`.

    OUT/pack.json                    format, source, splits: classes, shards (size, crc32), bad files
    OUT/ILSVRC2012_devkit_t12/       the devkit, copied
    OUT/<split>/shard-000000.tar     the samples, in the tree index's order
    OUT/<split>/shard-000000.json    the shard's rows, written after it: the proof it is complete
    OUT/index/<split>.npy            one fixed-size record per sample (INDEX_DTYPE), memory-mapped
    OUT/index/<split>.paths.npy      its original root-relative path, memory-mapped
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.errors import DataError

PACK_FILE = "pack.json"
PACK_FORMAT = 1
SPLITS = ("train", "val", "test")
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u4"), ("shard", "<i4"), ("label", "<i8"), ("width", "<u4"),
                        ("height", "<u4"), ("crc32", "<u4"), ("flags", "<u4")])
BAD = 1  # flags: the file did not decode; it is in no shard
REENCODED = 2  # flags: re-encoded because it was larger than --max-side
SHARD_NAME = "shard-{:06d}.tar"


def is_pack(root: str | Path) -> bool:
    """A pack is recognised by its pack.json."""
    return (Path(root) / PACK_FILE).is_file()


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / PACK_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable pack manifest ({e})") from None
    if manifest.get("format") != PACK_FORMAT:
        raise DataError(f"{path}: pack format {manifest.get('format')!r}, this code reads {PACK_FORMAT}")
    return manifest


class PathsView(Sequence[str]):
    """The original paths of a split (or of a subset of it), decoded on access from a memory-mapped array.

    Pickled by name (the pack and split), never by content: a spawned worker maps the file itself.
    """

    def __init__(self, pack_dir: str | Path, split: str, rows: np.ndarray | None = None, strip: int = 0) -> None:
        self.pack_dir, self.split, self.rows, self.strip = Path(pack_dir), split, rows, strip
        self._paths: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_paths": None}

    @property
    def paths(self) -> np.ndarray:
        if self._paths is None:
            self._paths = load_paths(self.pack_dir, self.split)
        return self._paths

    def __len__(self) -> int:
        return len(self.paths) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = i if self.rows is None else int(self.rows[i])
        return self.paths[row].decode()[self.strip:]

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def keep(self, excluded: set[str]) -> np.ndarray:
        """Positions whose path is not in `excluded` (vectorised: no per-path Python work)."""
        names = self.paths if self.rows is None else self.paths[self.rows]
        if self.strip:  # prediction folders (names without the split): small, a loop will do
            return np.flatnonzero([n.decode()[self.strip:] not in excluded for n in names])
        return np.flatnonzero(~np.isin(names, np.array(sorted(e.encode() for e in excluded), dtype=names.dtype)))

    def subset(self, keep: np.ndarray) -> PathsView:
        return PathsView(self.pack_dir, self.split, keep if self.rows is None else self.rows[keep], self.strip)


class PackedSamples:
    """The samples of one split of a pack, read by offset from its shards.

    Picklable (DALI's spawned workers): the index is memory-mapped again and the shards are opened
    again in each process, once each, lazily. `rows` maps our positions to the split's records.
    """

    def __init__(self, pack_dir: str | Path, split: str, rows: np.ndarray | None = None,
                 shard_dir: str | Path | None = None) -> None:
        self.pack_dir, self.split, self.rows = Path(pack_dir), split, rows
        self.shard_dir = Path(shard_dir) if shard_dir else self.pack_dir / split
        self._index: np.ndarray | None = None
        self._fds: dict[int, int] = {}
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None, "_fds": {}, "_pid": 0}

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = load_index(self.pack_dir, self.split)
        return self._index

    def record(self, i: int) -> np.void:
        return self.index[i if self.rows is None else int(self.rows[i])]

    def read(self, i: int) -> bytes:
        """The bytes of sample i (b"" for a file that was bad when packed)."""
        r = self.record(i)
        if r["flags"] & BAD:
            return b""
        return os.pread(self._fd(int(r["shard"])), int(r["size"]), int(r["offset"]))

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) from the index: no header parse."""
        r = self.record(i)
        return int(r["width"]), int(r["height"])

    def subset(self, keep: np.ndarray) -> PackedSamples:
        rows = keep if self.rows is None else self.rows[keep]
        return PackedSamples(self.pack_dir, self.split, np.asarray(rows, np.int64), self.shard_dir)

    def staged(self, shard_dir: str | Path) -> PackedSamples:
        """The same samples read from a copy of the shards in `shard_dir` (node-local staging)."""
        return PackedSamples(self.pack_dir, self.split, self.rows, shard_dir)

    def mean_bytes(self) -> float:
        """The mean size of the samples (from the index: nothing read)."""
        sizes = self.index["size"] if self.rows is None else self.index["size"][self.rows]
        return float(np.mean(sizes)) if len(sizes) else 0.0

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors, opened afresh
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_dir / SHARD_NAME.format(shard), os.O_RDONLY)
        return fd


def file_crc32(path: str | Path, fsync: bool = False) -> tuple[int, int]:
    """(crc32, bytes) of a file, read in 8 MiB chunks; `fsync` also flushes it to disk.

    Raises:
        OSError: unreadable.
    """
    crc, size = 0, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return crc, size


def load_index(pack_dir: str | Path, split: str) -> np.ndarray:
    """The split's records, memory-mapped (shared by every process that maps them, never copied)."""
    path = Path(pack_dir) / "index" / f"{split}.npy"
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the pack's index ({e})") from None


def load_paths(pack_dir: str | Path, split: str) -> np.ndarray:
    return np.load(Path(pack_dir) / "index" / f"{split}.paths.npy", mmap_mode="r")


def split_of(folder: str | Path) -> tuple[Path, str] | None:
    """(pack root, split) when `folder` is a split folder of a pack (e.g. PACK/test), else None."""
    folder = Path(folder)
    if is_pack(folder.parent) and folder.name in read_manifest(folder.parent).get("splits", {}):
        return folder.parent, folder.name
    return None


def bad_paths(pack_dir: str | Path) -> set[str]:
    """Root-relative paths of the files left out as undecodable when the pack was made."""
    return {b["path"] for split in read_manifest(pack_dir)["splits"].values() for b in split.get("bad", [])}
