"""`senet predict` -> `senet evaluate`: the challenge's numbers agree with the engine's, in devkit IDs.

The model is the session's trained run (tests/conftest.py `learned`), on synthetic data whose devkit
numbers the classes in a shuffled WNID order.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import index_train, list_images
from pipeline.devkit import find_devkit, load_devkit
from pipeline.synthetic import SyntheticSpec, make_synthetic
from tests.helpers import as_version_1, flip_a_bit
from training.checkpoint import load_checkpoint
from training.metrics import read_metrics
from training.submission import format_submission, read_submission

SENET = [sys.executable, "-m", "senet"]
CLASSES = 6


def senet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(SENET + list(args), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(learned: dict[str, Path]) -> dict[str, Path]:
    """The session's trained run (tests/conftest.py): se_resnext_tiny on 6 synthetic classes."""
    return learned


def predict(t: dict[str, Path], images: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = senet("predict", str(t["run"] / "checkpoints" / "best.pt"), str(t["data"] / images), "--devkit",
                 str(t["devkit"]), "--out", str(out), "--cache-dir", str(t["cache"]), "--batch-size", "7", *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def evaluate(t: dict[str, Path], predictions: Path, tmp_path: Path) -> dict:
    gt = t["devkit"] / "data" / "ILSVRC2012_validation_ground_truth.txt"
    done = senet("evaluate", str(predictions), "--ground-truth", str(gt), "--devkit", str(t["devkit"]),
                 "--json", str(tmp_path / "score.json"))
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "score.json").read_text())


def engine_row(t: dict[str, Path]) -> dict:
    """The validation row of the epoch best.pt holds."""
    best = torch.load(t["run"] / "checkpoints" / "best.pt", weights_only=True)
    return next(r for r in read_metrics(t["run"] / "metrics.jsonl") if "val_top1" in r and r["step"] == best["step"])


def test_single_crop_val_prediction_scores_exactly_what_the_engine_measured(trained: dict, tmp_path: Path) -> None:
    """By default predict scores the weights best.pt names (raw or EMA): the engine's number for them."""
    best = torch.load(trained["run"] / "checkpoints" / "best.pt", weights_only=True)
    engine, suffix = engine_row(trained), "_ema" if best["best_weights"] == "ema" else ""
    assert best["best_top1"] == engine["val_top1" + suffix] > 0.5  # the model learned something (chance is 1/6)
    done = predict(trained, "val", tmp_path / "val.txt", "--scores", str(tmp_path / "val.npy"))
    assert ("weight EMA" if suffix else "raw weights") in done.stdout
    score = evaluate(trained, tmp_path / "val.txt", tmp_path)
    assert score["images"] == CLASSES * 10
    assert score["top1_error"] == pytest.approx(1 - engine["val_top1" + suffix], abs=1e-12)
    assert score["top5_error"] == pytest.approx(1 - engine["val_top5" + suffix], abs=1e-12)
    probs = np.load(tmp_path / "val.npy")
    assert probs.shape == (CLASSES * 10, CLASSES) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_the_other_weights_on_request_and_another_test_resolution(trained: dict, tmp_path: Path) -> None:
    """--weights names the weights best.pt did not choose (the default run above scores the chosen ones): the
    engine's number for them; --crop-size scores the same weights at another test size."""
    best = torch.load(trained["run"] / "checkpoints" / "best.pt", weights_only=True)
    other = "raw" if best["best_weights"] == "ema" else "ema"
    predict(trained, "val", tmp_path / "other.txt", "--weights", other, "--scores", str(tmp_path / "other.npy"))
    expected = engine_row(trained)["val_top1_ema" if other == "ema" else "val_top1"]
    assert evaluate(trained, tmp_path / "other.txt", tmp_path)["top1_error"] == pytest.approx(1 - expected, abs=1e-12)
    done = predict(trained, "val", tmp_path / "large.txt", "--weights", other, "--crop-size", "80", "--scores",
                   str(tmp_path / "large.npy"))
    assert "at 80 px" in done.stdout
    assert not np.allclose(np.load(tmp_path / "large.npy"), np.load(tmp_path / "other.npy"))


def test_the_id_order_trap(trained: dict, tmp_path: Path) -> None:
    """The same predictions written as sorted-WNID indices instead of devkit IDs score far worse."""
    predict(trained, "val", tmp_path / "val.txt", "--scores", str(tmp_path / "val.npy"))
    kit = load_devkit(find_devkit(trained["data"]))
    classes = index_train(trained["data"]).classes
    ids = kit.ilsvrc_ids(classes)
    assert ids.tolist() != list(range(1, CLASSES + 1))
    probs = np.load(tmp_path / "val.npy")  # devkit-ID columns
    model_order = probs[:, ids - 1]  # back to the model's own (sorted-WNID) columns
    wrong = np.argsort(-model_order, axis=1, kind="stable")[:, :5] + 1  # the bug: index + 1 taken for an ID
    (tmp_path / "wrong.txt").write_text(format_submission(wrong))
    right = evaluate(trained, tmp_path / "val.txt", tmp_path)
    bad = evaluate(trained, tmp_path / "wrong.txt", tmp_path)
    assert bad["top1_error"] > right["top1_error"] + 0.2


def test_test_set_gets_one_valid_line_per_image_even_excluded_ones(trained: dict, tmp_path: Path) -> None:
    done = predict(trained, "test", tmp_path / "test.txt")
    names = list_images(trained["data"] / "test")
    rows = read_submission(tmp_path / "test.txt", num_classes=CLASSES, num_images=len(names))
    assert all(len(r) == min(5, CLASSES) for r in rows)
    assert "ILSVRC2012_test_00000004.JPEG is on the exclusion list" in done.stderr
    assert "1 on the exclusion list" in done.stdout


def test_ten_crop_and_multi_process_predictions(trained: dict, tmp_path: Path) -> None:
    predict(trained, "val", tmp_path / "one.txt", "--scores", str(tmp_path / "one.npy"))
    predict(trained, "val", tmp_path / "three.txt", "--nproc", "3", "--scores", str(tmp_path / "three.npy"))
    assert (tmp_path / "one.txt").read_text() == (tmp_path / "three.txt").read_text()
    assert np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "three.npy"), atol=1e-6)
    predict(trained, "val", tmp_path / "ten.txt", "--ten-crop", "--scores", str(tmp_path / "ten.npy"))
    ten = np.load(tmp_path / "ten.npy")
    assert ten.shape == np.load(tmp_path / "one.npy").shape and not np.allclose(ten, np.load(tmp_path / "one.npy"))
    assert evaluate(trained, tmp_path / "ten.txt", tmp_path)["top1_error"] < 0.5


def test_a_checkpoint_for_other_classes_is_a_clear_error(trained: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_synthetic(other, SyntheticSpec(classes=4, train_per_class=2, val_per_class=1, test=1, min_side=64, max_side=80))
    done = senet("predict", str(trained["run"] / "checkpoints" / "best.pt"), str(other / "test"), "--devkit",
                 str(other / "ILSVRC2012_devkit_t12"), "--out", str(tmp_path / "x.txt"))
    assert done.returncode == 1 and "are not in the devkit" in done.stderr and "Traceback" not in done.stderr
    done = senet("predict", str(tmp_path / "missing.pt"), str(other / "test"), "--devkit",
                 str(other / "ILSVRC2012_devkit_t12"), "--out", str(tmp_path / "x.txt"))
    assert done.returncode == 1 and "missing.pt: no such checkpoint" in done.stderr


def test_a_version_1_checkpoint_predicts_the_same_and_a_damaged_one_is_one_line(trained: dict, tmp_path: Path) -> None:
    """best.pt rewritten in the layout of the code before format version 2 (torch.save of the version 1 dict)."""
    old = tmp_path / "version1.pt"
    torch.save(as_version_1(load_checkpoint(trained["run"] / "checkpoints" / "best.pt")), old)
    common = [str(trained["data"] / "test"), "--devkit", str(trained["devkit"]), "--cache-dir", str(trained["cache"])]
    predict(trained, "test", tmp_path / "now.txt")
    done = senet("predict", str(old), *common, "--out", str(tmp_path / "then.txt"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "then.txt").read_text() == (tmp_path / "now.txt").read_text()

    flip_a_bit(old)  # no manifest beside it: its zip CRC-32s tell
    done = senet("predict", str(old), *common, "--out", str(tmp_path / "never.txt"))
    errors = [line for line in done.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert done.returncode == 1 and len(errors) == 1 and f"{old}: unusable checkpoint" in errors[0], done.stderr
