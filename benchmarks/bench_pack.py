"""Files vs a pack vs a staged pack: opens and bytes per epoch, images/s of `read` and `full`; pack
throughput; the index of a 1.28 M-sample split.

1. Writes (once) a tree of ImageNet-like JPEGs (500x375, q90, ~100 KB: benchmarks/gpu_sections.py's
   generator), packs it (`senet pack`, timed: images/s and MB/s on this machine's cores), and stages
   the pack into a second folder (timed).
2. Runs `senet bench-input --stages read,full` on the tree, the pack and the staged copy, each under
   `strace -f` (openat, read, pread64: the system calls a shared file system serves), and reports
   opens and bytes read per epoch-equivalent (per image read) next to images/s and CPU ms/image.
   strace slows every system call: the images/s of the traced runs are not the speed; a second,
   untraced run of each gives it.
3. Builds an index of 1,281,167 samples (ImageNet's train size) and times loading it as senet does
   (memory-mapped records and paths, labels, a class-aware sampler's first epoch).

Usage::

    python benchmarks/bench_pack.py --data /tmp/senet-bench-pack --images 3000 --json pack.json

Measures and prints; never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_sections import photo_tree  # noqa: E402
from pipeline.pack_reader import INDEX_DTYPE, PACK_FILE, PACK_FORMAT  # noqa: E402
from pipeline.pack_writer import PackSpec, pack  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def traced(data: str, cache: str, stages: str, batches: int, trace: bool) -> dict[str, Any]:
    """bench-input on `data` (optionally under strace); images/s, CPU ms and, traced, the system calls."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "senet", "bench-input", data, "--stages", stages, "--batches", str(batches),
               "--warmup", "2", "--batch-size", "32", "--threads", "1", "--py-workers", "1", "--crop-size", "224",
               "--cache-dir", cache, "--json", str(out)]
        if trace:
            cmd = ["strace", "-f", "-qq", "-e", "trace=openat,read,pread64", "-o", str(Path(tmp) / "trace"), *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        result = json.loads(out.read_text())
        if trace:
            result["syscalls"] = _count(Path(tmp) / "trace", data)
    return result


def _count(trace: Path, data: str) -> dict[str, int]:
    """Opens of files under `data`, and bytes read by read/pread64 from any file (all processes)."""
    opens = data_opens = reads = read_bytes = 0
    for line in trace.read_text(errors="replace").splitlines():
        m = re.search(r"(openat|read|pread64)\((.*)\)\s+=\s+(-?\d+)", line)
        if not m:
            continue
        call, args, ret = m.group(1), m.group(2), int(m.group(3))
        if call == "openat":
            opens += 1
            data_opens += data in args
        elif ret > 0:
            reads += 1
            read_bytes += ret
    return {"opens": opens, "data_opens": data_opens, "reads": reads, "read_bytes": read_bytes}


def big_index(folder: Path, samples: int = IMAGENET_TRAIN, classes: int = 1000) -> Path:
    """A pack-shaped index of `samples` records (no shards): what loading costs at ImageNet's size."""
    (folder / "index").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, classes, samples))
    records = np.zeros(samples, INDEX_DTYPE)
    records["label"], records["size"], records["width"], records["height"] = labels, 110_000, 500, 375
    np.save(folder / "index" / "train.npy", records)
    paths = np.array([f"train/n{c:08d}/n{c:08d}_{i}.JPEG".encode() for i, c in enumerate(labels)])
    np.save(folder / "index" / "train.paths.npy", paths)
    manifest = {"format": PACK_FORMAT, "classes": [f"n{c:08d}" for c in range(classes)],
                "splits": {"train": {"samples": samples, "shards": [], "bad": []}}}
    (folder / PACK_FILE).write_text(json.dumps(manifest))
    return folder


def time_index_load(folder: Path) -> dict[str, float]:
    code = ("import time, sys; t=time.perf_counter(); from pipeline.datasets import index_train; "
            "i=index_train(sys.argv[1]); n=len(i); l=i.labels.sum(); a=time.perf_counter(); "
            "from pipeline.sampling import ClassAwareSampler; s=ClassAwareSampler(i.labels, 8, 0, 0); "
            "o=s.rank_indices(0); b=time.perf_counter(); import resource; "
            "print(a-t, b-a, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    return {"load_s": float(out[0]), "sampler_first_epoch_s": float(out[1]), "max_rss_mib": int(out[2]) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/senet-bench-pack")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    base = Path(args.data)
    photo_tree(base / "tree" / "train", args.images, args.classes)  # a folder of class folders under train/
    tree = base / "tree"
    tree_bytes = sum(f.stat().st_size for f in (tree / "train").rglob("*.JPEG"))
    shutil.rmtree(base / "pack", ignore_errors=True)
    workers = os.cpu_count() or 1
    t = time.perf_counter()
    pack(tree, base / "pack", ("train",), PackSpec(shard_bytes=64 << 20, workers=workers))
    pack_s = time.perf_counter() - t
    rate = args.images / pack_s
    from pipeline.datasets import index_train
    from pipeline.stage import stage

    shutil.rmtree(base / "stage", ignore_errors=True)
    t = time.perf_counter()
    staged, report = stage(index_train(base / "pack").samples, str(base / "stage"), 0, 1)
    stage_s = time.perf_counter() - t
    staged_dir = base / "staged-pack"  # a pack whose shards are the staged copies, for bench-input
    shutil.rmtree(staged_dir, ignore_errors=True)
    shutil.copytree(base / "pack", staged_dir, ignore=shutil.ignore_patterns("*.tar"))
    for shard in staged.shard_dir.glob("*.tar"):
        os.symlink(shard, staged_dir / "train" / shard.name)
    cache = str(base / "cache")
    runs: dict[str, Any] = {}
    for name, data in (("files", tree), ("pack", base / "pack"), ("staged", staged_dir)):
        runs[name] = {"traced": traced(str(data), cache, "read,full", args.batches, True),
                      "untraced": traced(str(data), cache, "read,full", args.batches, False)}
        print(name, runs[name]["traced"]["syscalls"], runs[name]["untraced"]["stages"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        index = time_index_load(big_index(Path(tmp) / "big"))
    per_core = rate / workers
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {workers} CPUs", "images": args.images,
        "tree_bytes": tree_bytes, "pack_s": pack_s, "pack_images_per_s": rate,
        "pack_mb_per_s": tree_bytes / pack_s / 1e6,
        "projected_imagenet_pack_min_on_32_cores": IMAGENET_TRAIN / (per_core * 32) / 60,
        "stage_s": stage_s, "stage_mb_per_s": report["bytes"] / stage_s / 1e6, "runs": runs, "index_1281167": index,
        "images_read_per_run": (args.batches + 2) * 32 * 2,  # read + full stages, warm-up included
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
