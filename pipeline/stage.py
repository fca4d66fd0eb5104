"""Node-local staging of a pack's shards (`data.stage_dir`): copy once per node, then read locally.

Before the process group starts, the local ranks of a node split the shards between them (rank r
copies shards r, r + L, ...), each copy verified against the size and crc32 that pack.json records,
written under a temporary name and renamed into place (atomic), under a per-shard lock, so two jobs
or two nodes that share the folder never corrupt each other; then every rank waits for all of them
and reads the local copies. A verified copy is marked (`.staged`: its size, mtime and checksum):
a requeued job on the same node checks the marker and the file's size and mtime, and reuses the
copy without reading 140 GB again; a copy that was written to since (another mtime) is copied anew.

Not enough space is one line saying how much is needed and how much is free; then, as configured
(`data.stage_fallback`), the ranks read the pack in place with a warning, or stop.

Staged copies stay after the job (a requeue on the same node reuses them). They live in
STAGE_DIR/senet-<pack id>/; remove them with `rm -rf STAGE_DIR/senet-*` (a Slurm epilog, or by hand);
a node-local $TMPDIR that Slurm cleans per job removes them itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.pack_reader import SHARD_NAME, PackedSamples, read_manifest

log = logging.getLogger("senet.input")
MARKER = ".staged"
POLL_S = 0.2
CHUNK = 8 << 20


def stage_dir_of(stage_dir: str, pack_dir: Path) -> Path:
    """STAGE_DIR (its $VARS and ~ expanded here, on the node) / senet-<pack id>: one folder per pack."""
    base = Path(os.path.expanduser(os.path.expandvars(stage_dir)))
    manifest = (pack_dir / "pack.json").read_bytes()
    key = hashlib.sha1(str(pack_dir.resolve()).encode() + manifest).hexdigest()[:12]
    return base / f"senet-{pack_dir.resolve().name}-{key}"


def stage(samples: PackedSamples, stage_dir: str, local_rank: int, local_world_size: int, fallback: str = "read_in_place",
          timeout_s: float = 6 * 3600) -> tuple[PackedSamples, dict[str, Any]]:
    """Copy this node's share of the split's shards, wait for the others' shares; the samples read locally.

    Returns:
        The samples reading from the staged copies (or in place, after a fallback), and a report:
        folder, shards, bytes, copied (here), reused, seconds, fallback (why, when it fell back).

    Raises:
        DataError: too little space with fallback "error"; a copy that does not verify; other local
            ranks that never finished their share within `timeout_s`.
    """
    shards = read_manifest(samples.pack_dir)["splits"][samples.split]["shards"]
    target = stage_dir_of(stage_dir, samples.pack_dir) / samples.split
    report: dict[str, Any] = {"folder": str(target), "shards": len(shards), "bytes": sum(s["bytes"] for s in shards),
                              "copied": 0, "reused": 0}
    started = time.monotonic()
    try:
        target.mkdir(parents=True, exist_ok=True)
        missing = sum(s["bytes"] for s in shards if not verified(target, s))
        stat = os.statvfs(target)
        free = stat.f_bavail * stat.f_frsize
    except OSError as e:
        return _fall_back(samples, report, fallback, f"{target}: cannot use the staging folder ({e.strerror})")
    if missing > free:
        return _fall_back(samples, report, fallback,
                          f"{target}: staging the {samples.split} shards needs {missing / 2**30:.2f} GiB more but "
                          f"{free / 2**30:.2f} GiB are free; free some space, or set data.stage_dir elsewhere")
    for shard in shards[local_rank::max(1, local_world_size)]:
        done = copy_shard(samples.pack_dir / samples.split / SHARD_NAME.format(shard["shard"]), target, shard)
        report[done] += 1
    deadline = time.monotonic() + timeout_s
    while not all(verified(target, s) for s in shards):  # the other local ranks' shares
        if time.monotonic() > deadline:
            raise DataError(f"{target}: other local ranks did not finish staging within {timeout_s:.0f} s")
        time.sleep(POLL_S)
    report["seconds"] = round(time.monotonic() - started, 2)
    return samples.staged(target), report


def _fall_back(samples: PackedSamples, report: dict[str, Any], fallback: str,
               why: str) -> tuple[PackedSamples, dict[str, Any]]:
    if fallback == "error":
        raise DataError(why)
    log.warning("%s; reading the pack in place (data.stage_fallback=read_in_place)", why)
    return samples, {**report, "fallback": why}


def verified(target: Path, shard: dict[str, Any]) -> bool:
    """A staged copy whose marker matches the manifest and whose size and mtime match the marker."""
    path = target / SHARD_NAME.format(shard["shard"])
    try:
        marker = json.loads(path.with_name(path.name + MARKER).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (marker.get("bytes") == shard["bytes"] == st.st_size and marker.get("crc32") == shard["crc32"]
            and marker.get("mtime_ns") == st.st_mtime_ns)


def copy_shard(source: Path, target: Path, shard: dict[str, Any]) -> str:
    """Copy one shard into `target` unless a verified copy is there; 'copied' or 'reused'.

    Raises:
        DataError: the copy does not have the manifest's size and crc32 (twice: a bad source).
    """
    name = SHARD_NAME.format(shard["shard"])
    if verified(target, shard):
        return "reused"
    with open(target / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another stager of this folder waits here, then finds the copy
        if verified(target, shard):
            return "reused"
        for _ in range(2):
            tmp = target / f"{name}.tmp{os.getpid()}"
            size, crc = _copy(source, tmp)
            if size == shard["bytes"] and crc == shard["crc32"]:
                break
            tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"{source}: its copy in {target} has {size} bytes and crc32 {crc:08x}, the pack says "
                            f"{shard['bytes']} and {shard['crc32']:08x}: the shard is damaged; pack it again")
        final = target / name
        os.replace(tmp, final)
        marker = final.with_name(name + MARKER)
        marker.write_text(json.dumps({"bytes": size, "crc32": crc, "mtime_ns": final.stat().st_mtime_ns,
                                      "source": str(source)}))
    return "copied"


def _copy(source: Path, dest: Path) -> tuple[int, int]:
    """Copy, fsync and checksum in one pass; (bytes, crc32)."""
    size, crc = 0, 0
    try:
        with open(source, "rb") as src, open(dest, "wb") as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise DataError(f"{source} -> {dest}: cannot copy ({e.strerror})") from None
    return size, crc
