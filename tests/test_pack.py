"""`senet pack` and node-local staging: a pack is the tree it was made from, read by offset.

Real shards of real JPEGs (the small synthetic tree with its odd and undecodable files), real
processes: a 2-rank training run from a staged pack ends bit-identical to the run from the tree, and
predictions on packed val/test equal those on the tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import index_train, load_exclusions
from pipeline.errors import DataError
from pipeline.pack_reader import BAD, SHARD_NAME, load_index, read_manifest
from pipeline.pack_writer import PackSpec, pack
from pipeline.stage import MARKER, stage
from tests.helpers import planted
from training.checkpoint import load_checkpoint, parameters_digest

ROOT = Path(__file__).resolve().parents[1]
SENET = [sys.executable, "-m", "senet"]
SHARD = 64 << 10  # small shards, so that the small tree makes several


@pytest.fixture(scope="module")
def packed(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "pack"
    done = subprocess.run(SENET + ["pack", str(small_tree), str(out), "--shard-size", "64KB", "--workers", "2",
                                   "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_the_index_is_the_tree_with_its_bad_files_listed_and_left_out(small_tree: Path, packed: Path) -> None:
    tree, pack_index = index_train(small_tree), index_train(packed)
    assert list(pack_index.files) == list(tree.files) and np.array_equal(pack_index.labels, tree.labels)
    records = load_index(packed, "train")
    bad = {pack_index.files[i] for i in np.flatnonzero(records["flags"] & BAD)}
    assert bad == planted(small_tree, "truncated", "zero_bytes")
    manifest = read_manifest(packed)
    assert {b["path"] for b in manifest["splits"]["train"]["bad"]} == bad
    assert len(manifest["splits"]["train"]["shards"]) > 1 and manifest["classes"] == list(tree.classes)
    for i in range(len(tree)):
        if pack_index.files[i] not in bad:
            assert pack_index.read(i) == tree.read(i)  # the original bytes
    assert load_exclusions(packed, packed / "nocache") == bad  # the loaders exclude them
    assert (packed / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").is_file()
    assert set(manifest["splits"]) == {"train", "val", "test"}


def test_shards_are_plain_tars_in_the_webdataset_layout(packed: Path) -> None:
    records = load_index(packed, "train")
    with tarfile.open(packed / "train" / SHARD_NAME.format(0)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[0].endswith(".jpg") and names[1] == names[0].replace(".jpg", ".cls")
        first = int(names[0].split(".")[0])
        row = records[first]
        assert tar.extractfile(members[0]).read() == (packed / "train" / SHARD_NAME.format(0)).read_bytes()[
            int(row["offset"]):int(row["offset"]) + int(row["size"])]
        assert int(tar.extractfile(members[1]).read()) == int(row["label"])


def test_an_interrupted_pack_continues_without_rewriting_finished_shards(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "pack"
    pack(small_tree, out, ("train",), PackSpec(shard_bytes=SHARD))
    shards = sorted((out / "train").glob("shard-*.tar"))
    assert len(shards) >= 3
    (out / "pack.json").unlink()  # killed before the end: no manifest, the last shard half written
    shards[-1].with_suffix(".json").unlink()
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    stamps = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    before = load_index(out, "train").copy()
    time.sleep(0.05)
    pack(small_tree, out, ("train",), PackSpec(shard_bytes=SHARD))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards untouched
    assert np.array_equal(load_index(out, "train"), before) and (out / "pack.json").is_file()


def _train(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = ["model.arch=se_resnext_tiny", "model.num_classes=6", "train.device=cpu", "data.crop_size=32",
            "data.dtype=float32", "data.py_workers=1", "data.threads=1", "train.precision=fp32", "train.epochs=2",
            "train.batch_size=4", "train.checkpoint_every=1000", f"data.root={data}", f"data.cache_dir={cache}",
            "optim.lr=0.1", "optim.reference_batch=8", *extra]
    return subprocess.run(SENET + ["train", str(ROOT / "configs" / "demo.yaml"), "--nproc", "2", "--out", str(out),
                                   *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_a_run_from_the_staged_pack_is_bit_identical_to_the_run_from_the_tree(small_tree: Path, packed: Path,
                                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    subprocess.run(SENET + ["check-data", str(small_tree), "--cache-dir", str(cache), "--quiet"], capture_output=True)
    tree = _train(small_tree, tmp_path / "tree", cache)
    assert tree.returncode == 0, tree.stderr[-2000:]
    from_pack = _train(packed, tmp_path / "pack", cache, f"data.stage_dir={tmp_path / 'stage'}")
    assert from_pack.returncode == 0, from_pack.stderr[-2000:]
    assert "staged" in from_pack.stderr
    digests = [parameters_digest(load_checkpoint(run / "checkpoints" / "last.pt")["model"]) for run in
               (tmp_path / "tree", tmp_path / "pack")]
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["val", "test"])
def test_predictions_on_a_packed_split_equal_those_on_the_tree(learned: dict[str, Path], tmp_path: Path,
                                                               split: str) -> None:
    data = learned["data"]
    out = tmp_path / "pack"
    assert subprocess.run(SENET + ["pack", str(data), str(out), "--split", split, "--quiet"], capture_output=True,
                          timeout=300).returncode == 0
    results = []
    for images in (data / split, out / split):
        target = tmp_path / f"{images.parent.name}-{split}.txt"
        done = subprocess.run(SENET + ["predict", str(learned["run"] / "checkpoints" / "best.pt"), str(images),
                                       "--devkit", str(learned["devkit"]), "--out", str(target), "--cache-dir",
                                       str(learned["cache"]), "--scores", str(target.with_suffix(".npy"))],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append((target.read_text(), np.load(target.with_suffix(".npy"))))
    assert results[0][0] == results[1][0] and np.array_equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------ staging
def test_staging_reuses_a_verified_copy_and_replaces_a_damaged_one(packed: Path, tmp_path: Path) -> None:
    samples = index_train(packed).samples
    staged, first = stage(samples, str(tmp_path), 0, 1)
    shards = read_manifest(packed)["splits"]["train"]["shards"]
    assert first["copied"] == len(shards) and first["reused"] == 0
    assert staged.read(5) == samples.read(5) and str(staged.shard_dir).startswith(str(tmp_path))
    _, again = stage(samples, str(tmp_path), 0, 1)
    assert again == {**again, "copied": 0, "reused": len(shards)}  # a requeue on this node: nothing read again
    damaged = staged.shard_dir / SHARD_NAME.format(1)
    with open(damaged, "r+b") as f:
        f.write(b"\0" * 16)
    _, third = stage(samples, str(tmp_path), 0, 1)
    assert third["copied"] == 1 and third["reused"] == len(shards) - 1
    assert damaged.read_bytes() == (packed / "train" / SHARD_NAME.format(1)).read_bytes()


def test_stage_dir_variables_are_expanded_on_the_node(packed: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    staged, _ = stage(index_train(packed).samples, "$NODE_SCRATCH/senet", 0, 1)
    assert str(staged.shard_dir).startswith(str(tmp_path / "scratch" / "senet"))


_STAGER = """
import sys
from pipeline.datasets import index_train
from pipeline.stage import stage
staged, report = stage(index_train(sys.argv[1]).samples, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
print(report["copied"], report["reused"])
"""


def test_concurrent_stagers_of_one_folder_end_with_one_good_copy(packed: Path, tmp_path: Path) -> None:
    """Two 'nodes' sharing a folder, each with two local ranks: four processes, every shard copied once."""
    procs = [subprocess.Popen([sys.executable, "-c", _STAGER, str(packed), str(tmp_path), str(rank), "2"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for _node in range(2) for rank in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    shards = read_manifest(packed)["splits"]["train"]["shards"]
    assert sum(int(o[0]) for o in outs) == len(shards)  # each shard copied by exactly one process
    target = next(tmp_path.glob("senet-*")) / "train"
    for s in shards:
        assert (target / SHARD_NAME.format(s["shard"])).read_bytes() == \
            (packed / "train" / SHARD_NAME.format(s["shard"])).read_bytes()
        assert (target / (SHARD_NAME.format(s["shard"]) + MARKER)).is_file()
    assert not list(target.glob("*.tmp*"))


def test_too_little_space_is_one_line_then_read_in_place_or_stop(packed: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import pipeline.stage as stage_module

    real = os.statvfs

    class Full:
        def __init__(self, path: str) -> None:
            self.f_frsize, self.f_bavail = real(path).f_frsize, 1

    monkeypatch.setattr(stage_module.os, "statvfs", Full)
    samples = index_train(packed).samples
    with caplog.at_level("WARNING", logger="senet.input"):
        same, report = stage(samples, str(tmp_path), 0, 1, fallback="read_in_place")
    assert same is samples and "needs" in report["fallback"] and "GiB are free" in caplog.text
    with pytest.raises(DataError, match=r"needs .* GiB more but .* GiB are free") as e:
        stage(samples, str(tmp_path), 0, 1, fallback="error")
    assert "\n" not in str(e.value)
    assert json.loads((packed / "pack.json").read_text())  # nothing of the pack was touched
