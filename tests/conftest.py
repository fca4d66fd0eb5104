"""Shared fixtures: small real data sets written by `make-synthetic` (real JPEGs, real devkit)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synthetic import SyntheticSpec, make_synthetic

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
