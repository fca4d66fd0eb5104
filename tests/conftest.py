"""Shared fixtures: small real data sets written by `make-synthetic` (real JPEGs, real devkit)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.augment import AugmentSpec
from pipeline.datasets import ImageIndex, index_train
from pipeline.loader import TrainLoader
from pipeline.synthetic import SyntheticSpec, make_synthetic
from training.control import RunControl

SMALL = SyntheticSpec(classes=6, train_per_class=12, val_per_class=4, test=8, imbalance=3.0, corrupt=5, seed=7,
                      min_side=64, max_side=160)


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ILSVRC2012-layout tree with 6 classes, a long tail and the five planted odd/bad files.

    Session-scoped and shared: tests must not modify it (copy it first).
    """
    root = tmp_path_factory.mktemp("data") / "ilsvrc"
    make_synthetic(root, SMALL)
    return root


LOADER_CROP = 32


def train_loader(index: ImageIndex, **kw) -> TrainLoader:
    """A small CPU TrainLoader (6 images of 32 px, class-aware); keywords override."""
    args = dict(batch_size=6, rank=0, world_size=1, device="cpu", seed=11, sampling="class_aware",
                samples_per_epoch=None, aug=AugmentSpec(), crop_size=LOADER_CROP, dtype="float16", layout="NCHW",
                threads=1, py_workers=0, prefetch=2, exclude=frozenset())
    return TrainLoader(index, **{**args, **kw})


@pytest.fixture(scope="module")
def clean(small_tree: Path) -> tuple[ImageIndex, frozenset[str]]:
    """The training index of the small tree and its planted undecodable files (to exclude)."""
    return index_train(small_tree), frozenset(planted(small_tree, "truncated", "zero_bytes"))


def planted(tree: Path, *kinds: str) -> set[str]:
    """Root-relative paths of the files `make-synthetic --corrupt` planted, of these kinds."""
    return {p["path"] for p in json.loads((tree / "synthetic.json").read_text())["planted"] if p["kind"] in kinds}


def tree_with_a_pipeline_killer(tree: Path, dest: Path) -> tuple[ImageIndex, str]:
    """`tree`'s training images less its undecodable ones, linked under `dest`, with one file broken so that
    it passes the byte screen but kills the decoder (a bogus Huffman table). Returns the index and that file."""
    index = index_train(tree)
    keep = [i for i, f in enumerate(index.files) if f not in planted(tree, "truncated", "zero_bytes")]
    index = ImageIndex(index.root, tuple(index.files[i] for i in keep), index.labels[keep], index.classes)
    victim = index.files[3]
    data = (index.root / victim).read_bytes()
    for f in set(index.files):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).symlink_to(index.root / f)
    (dest / victim).unlink()
    dht = data.find(b"\xff\xc4")  # the header and the end marker stay fine
    (dest / victim).write_bytes(data[:dht + 5] + b"\xff" * 20 + data[dht + 25:])
    return ImageIndex(dest, index.files, index.labels, index.classes), victim


class CheckpointRecorder(RunControl):
    """A RunControl that agrees on requests at every step and records the steps of the checkpoints it asked for."""

    def __init__(self) -> None:
        super().__init__(check_every=1)
        self.saved: list[int] = []

    def on_checkpoint_saved(self, path: Path, step: int) -> None:
        self.saved.append(step)


LEARN_CLASSES = 6


LEARN_EPOCHS = 4
ROOT = Path(__file__).resolve().parents[1]


def train_demo_recipe(data: Path, cache: Path, out: Path, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    """`senet train configs/demo.yaml` on `data` (num_classes set to match), 4 epochs: the recipe a new user runs."""
    classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
    sets = (f"model.num_classes={classes}", f"data.root={data}", f"data.cache_dir={cache}",
            f"train.epochs={LEARN_EPOCHS}", *sets)
    return subprocess.run([sys.executable, "-m", "senet", "train", str(ROOT / "configs" / "demo.yaml"), "--nproc",
                           str(nproc), "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.fixture(scope="session")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real training run shared by the tests that need a trained model.

    The demo recipe (configs/demo.yaml: se_resnext_tiny at 64 px, class-aware sampling, flip, rotation,
    colour jitter) on `senet make-synthetic`'s default images, 6 classes x 80, two gloo processes, 4
    epochs. One test image is emptied first, so check-data's exclusion list has an entry for `predict`
    to honour. Returns the data root, the cache folder (exclusion list), the run folder and the devkit.
    """
    tmp = tmp_path_factory.mktemp("learned")
    data, cache, out = tmp / "data", tmp / "cache", tmp / "run"
    make_synthetic(data, SyntheticSpec(classes=LEARN_CLASSES, train_per_class=80, val_per_class=10, test=10, seed=1))
    (data / "test" / "ILSVRC2012_test_00000004.JPEG").write_bytes(b"")
    subprocess.run([sys.executable, "-m", "senet", "check-data", str(data), "--cache-dir", str(cache), "--quiet"],
                   capture_output=True, check=False)
    done = train_demo_recipe(data, cache, out, 2, "train.log_every=5", "train.checkpoint_every=50")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"data": data, "cache": cache, "run": out, "devkit": data / "ILSVRC2012_devkit_t12", "log": done.stdout}
