"""Shared fixtures: small real data sets written by `make-synthetic` (real JPEGs, real devkit)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.datasets import ImageIndex, index_train
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


@pytest.fixture(scope="session")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real training run shared by the tests that need a trained model.

    Two gloo processes, class-aware sampling and the full augmentation (flip, rotation, colour jitter)
    train se_resnext_tiny on 6 synthetic classes of small images (64-112 px) for 16 epochs. One test
    image is emptied first, so check-data's exclusion list has an entry for `predict` to honour.
    Returns the data root, the cache folder (exclusion list), the run folder and the devkit.
    """
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("learned")
    data, cache, out = tmp / "data", tmp / "cache", tmp / "run"
    make_synthetic(data, SyntheticSpec(classes=LEARN_CLASSES, train_per_class=100, val_per_class=10, test=10, seed=1,
                                       min_side=64, max_side=112))
    (data / "test" / "ILSVRC2012_test_00000004.JPEG").write_bytes(b"")
    senet = [sys.executable, "-m", "senet"]
    subprocess.run(senet + ["check-data", str(data), "--cache-dir", str(cache), "--quiet"], capture_output=True, check=False)
    config = tmp / "tiny.yaml"
    config.write_text("model:\n  arch: se_resnext_tiny\n  channels_last: false\ntrain:\n  seed: 3\n")
    sets = [f"model.num_classes={LEARN_CLASSES}", "train.device=cpu", "data.dtype=float32", "data.py_workers=1",
            "data.threads=1", "train.precision=fp32", f"data.root={data}", f"data.cache_dir={cache}",
            "data.sampling=class_aware", "data.crop_size=48", "data.rotation=10", "data.brightness=0.4",
            "data.contrast=0.4", "data.saturation=0.4", "data.hue=0.05", "data.flip=0.5", "train.epochs=16",
            "train.batch_size=16", "train.log_every=5", "train.checkpoint_every=50", "optim.lr=0.15",
            "optim.reference_batch=64", "optim.warmup_epochs=1", "optim.schedule=cosine", "optim.label_smoothing=0.1"]
    done = subprocess.run(senet + ["train", str(config), "--nproc", "2", "--out", str(out),
                                   *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"data": data, "cache": cache, "run": out, "devkit": data / "ILSVRC2012_devkit_t12", "log": done.stdout}
