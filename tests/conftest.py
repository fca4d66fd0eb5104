"""Shared fixtures: small real data sets written by `make-synthetic` (real JPEGs, real devkit)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.datasets import ImageIndex, index_train
from pipeline.synthetic import SyntheticSpec, make_synthetic
from tests.helpers import (IN_MEMORY, LEARN_CLASSES, SMALL, fit_in_memory, planted, process_settings_kept,
                           train_demo_recipe)
from training.config import load_config


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ILSVRC2012-layout tree with 6 classes, a long tail and the five planted odd/bad files.

    Session-scoped and shared: tests must not modify it (copy it first).
    """
    root = tmp_path_factory.mktemp("data") / "ilsvrc"
    make_synthetic(root, SMALL)
    return root


@pytest.fixture(scope="module")
def clean(small_tree: Path) -> tuple[ImageIndex, frozenset[str]]:
    """The training index of the small tree and its planted undecodable files (to exclude)."""
    return index_train(small_tree), frozenset(planted(small_tree, "truncated", "zero_bytes"))


@pytest.fixture(scope="session")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real training run shared by the tests that need a trained model.

    The demo recipe (configs/demo.yaml: se_resnext_tiny at 64 px, class-aware sampling, flip, rotation,
    colour jitter) on `senet make-synthetic`'s default images, 6 classes x 80, two gloo processes, 4
    epochs, with a weight EMA (decay 0.9) validated beside the raw weights. One test image is emptied
    first, so check-data's exclusion list has an entry for `predict` to honour. Returns the data root,
    the cache folder (exclusion list), the run folder and the devkit.
    """
    tmp = tmp_path_factory.mktemp("learned")
    data, cache, out = tmp / "data", tmp / "cache", tmp / "run"
    make_synthetic(data, SyntheticSpec(classes=LEARN_CLASSES, train_per_class=80, val_per_class=10, test=10, seed=1))
    (data / "test" / "ILSVRC2012_test_00000004.JPEG").write_bytes(b"")
    subprocess.run([sys.executable, "-m", "senet", "check-data", str(data), "--cache-dir", str(cache), "--quiet"],
                   capture_output=True, check=False)
    done = train_demo_recipe(data, cache, out, 2, "train.log_every=5", "train.checkpoint_every=50",
                             "train.ema_decay=0.9")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"data": data, "cache": cache, "run": out, "devkit": data / "ILSVRC2012_devkit_t12", "log": done.stdout}


@pytest.fixture
def in_memory(tmp_path: Path):
    """`fit(out, resume, control=None, train=None, sets=())` of a small net on resident tensors (no data folder,
    no DALI: a run takes a second), the base config, and tmp_path."""
    with process_settings_kept():  # build() sets them for this process; leave the next tests as found
        yield fit_in_memory, load_config(None, IN_MEMORY), tmp_path


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """`mount(size_bytes)`: a fresh tmpfs of that size under tmp_path (a disk that really fills up); unmounted after.

    Skips, saying why, where mounting is not allowed (it needs root and CAP_SYS_ADMIN).
    """
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the full-disk test "
                        f"needs root with CAP_SYS_ADMIN")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
