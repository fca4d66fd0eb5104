"""Files that survive a crash: written whole or not at all, with a sha256 of exactly the bytes written.

A kill, a power cut or a full disk at any instant leaves the old file (or no file) under the final name,
never a torn one: the bytes go to a temporary file in the same folder, are fsynced, and only then
renamed over the final name (a rename within one file system is atomic); the folder is fsynced so that
the rename itself survives. On failure the temporary file is removed and the error is the file
system's own (`OSError` with its errno), whatever library was writing.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

CHUNK = 16 << 20  # bytes per read when hashing a file: large reads, bounded memory


@dataclass(frozen=True)
class FileDigest:
    """A file's size and sha256, as written or as read back."""

    bytes: int
    sha256: str


class HashingFile:
    """A binary file wrapper that hashes what is written through it and keeps the first OSError.

    torch.save calls `write` with memoryviews of tensor storage (no copy); the sha256 is computed on the
    way, so the checksum is of the bytes handed to the file system, not of a later re-read. A library
    that wraps a failed write in its own exception (torch's zip writer does) cannot hide the errno:
    `error` keeps it.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self._sha.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self._f.flush()

    @property
    def digest(self) -> FileDigest:
        return FileDigest(self.size, self._sha.hexdigest())


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` puts `path`'s bytes until they are durable (hidden, named after the writer)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary(name: str) -> bool:
    """A name `temporary_name` makes: left behind only by a writer that was killed."""
    return name.startswith(".") and ".tmp" in name


@contextlib.contextmanager
def atomic_write(path: Path, check: Callable[[Path, FileDigest], None] | None = None) -> Iterator[HashingFile]:
    """Write `path` through the yielded HashingFile; the name points at the new bytes only once they are durable.

    Args:
        path: the final name.
        check: called with the temporary file and the digest of what was written, after fsync and before
            the rename; whatever it raises leaves the old file in place (e.g. a read-back that differs).

    Raises:
        OSError: the file system's error (ENOSPC, EDQUOT, EIO...); the temporary file is gone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    f = open(tmp, "wb")
    out = HashingFile(f)
    try:
        yield out
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        f.close()
        if check is not None:
            check(tmp, out.digest)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()  # flushing the rest may fail again on a full disk
        tmp.unlink(missing_ok=True)
        if out.error is not None:
            raise out.error from None  # the errno, not the writing library's wrapper
        raise


def file_digest(path: Path, from_storage: bool = False) -> FileDigest:
    """Size and sha256 of a file, read in chunks.

    Args:
        path: the file.
        from_storage: drop the file's cached pages first, so that the bytes come from the storage (a local
            disk, an NFS or Lustre server) rather than from this node's memory of what was written.
    """
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if from_storage and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return FileDigest(size, sha.hexdigest())


def point_name(link: Path, target: str) -> None:
    """Make `link` name the file `target` of the same folder, atomically: a relative symlink where the file
    system has them, else a hard link, else a copy (a reader never finds `link` missing or half-made)."""
    tmp = temporary_name(link)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
    except OSError:
        try:
            os.link(link.parent / target, tmp)
        except OSError:
            with open(link.parent / target, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
    os.replace(tmp, link)


def fsync_dir(folder: Path) -> None:
    """Make the folder's last renames and removals durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
