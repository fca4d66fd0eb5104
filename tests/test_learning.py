"""The synthetic data set is learnable with the demo's recipe, as a new user gets them both.

`senet make-synthetic` with its defaults (images of 200-500 px, random colours and clutter) and
configs/demo.yaml (se_resnext_tiny at 64 px, full augmentation), `model.num_classes` set to match:
6 classes x 80 training images reach at least 50 % val top-1 (chance: 17 %) in 4 epochs at batch 16
per process, on one process and on two, for each of five data seeds. Measured on a 2-core AMD EPYC:
0.78-0.93 on one process, 0.78-0.85 on two.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synthetic import SyntheticSpec, make_synthetic
from tests.helpers import LEARN_EPOCHS, train_demo_recipe
from training.metrics import read_metrics

SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("learning")
    out = {}
    for seed in SEEDS:
        out[seed] = root / f"data{seed}"
        make_synthetic(out[seed], SyntheticSpec(classes=6, train_per_class=80, val_per_class=20, test=0, seed=seed))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_six_synthetic_classes_are_learnt_in_four_epochs(trees: dict[int, Path], tmp_path: Path, seed: int,
                                                         nproc: int) -> None:
    done = train_demo_recipe(trees[seed], tmp_path / "cache", tmp_path / "run", nproc)
    assert done.returncode == 0, done.stderr[-2000:]
    val = [r["val_top1"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_top1" in r]
    assert len(val) == LEARN_EPOCHS and val[-1] >= 0.5, val
