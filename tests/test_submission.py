"""Submission files: the devkit format, validation naming the first bad line, challenge scoring, ensembles."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import index_train, index_val
from pipeline.devkit import find_devkit, load_devkit
from pipeline.errors import DataError
from training.submission import ensemble, format_submission, read_submission, score, top_ids

SENET = [sys.executable, "-m", "senet"]


def test_format_is_one_line_per_image_with_at_most_five_ids() -> None:
    assert format_submission([[3, 1, 2, 9, 8, 7], [5]]) == "3 1 2 9 8\n5\n"


def test_top_ids_are_devkit_ids_most_confident_first() -> None:
    scores = np.array([[0.1, 0.5, 0.2, 0.05, 0.1, 0.05], [0.6, 0.0, 0.0, 0.0, 0.1, 0.3]])
    assert top_ids(scores).tolist() == [[2, 3, 1, 5, 4], [1, 6, 5, 2, 3]]
    assert top_ids(scores[:, :3]).shape == (2, 3)  # fewer than 5 classes: as many guesses as classes


def test_scoring_counts_top1_and_top5_errors() -> None:
    truth = np.array([1, 2, 3, 4])
    guesses = [[1, 5], [5, 2], [5, 6, 7, 8, 9], [4]]
    s = score(guesses, truth)
    assert (s.top1_error, s.top5_error, s.images) == (0.5, 0.25, 4)


@pytest.mark.parametrize("text, message", [
    ("1 2 3\n4 x 6\n", "line 2: 'x' is not an integer ILSVRC2012_ID"),
    ("1 2 3\n1 2 3\n1 2 3\n1 2 3 4 5 6\n", "line 4: 6 guesses; at most 5"),
    ("1 2 3\n7 1001\n", "line 2: ID 1001 outside 1..1000"),
    ("1 2 0\n", "line 1: ID 0 outside 1..1000"),
    ("1 2 3\n4 4\n", "line 2: ID 4 guessed more than once"),
    ("1  2\n", "line 1: IDs must be separated by single spaces"),
    ("1\n\n3\n", "line 2: no guesses"),
])
def test_malformed_files_name_the_first_bad_line(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "pred.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        read_submission(f, num_classes=1000)


def test_wrong_line_count_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "pred.txt"
    f.write_text("1\n2\n")
    with pytest.raises(DataError, match="2 lines for 3 images"):
        read_submission(f, num_classes=10, num_images=3)


def test_ensemble_is_a_weighted_mean() -> None:
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert ensemble([a, b]).tolist() == [[0.5, 0.5]]
    assert ensemble([a, b], [3, 1]).tolist() == [[0.75, 0.25]]
    with pytest.raises(ValueError, match="2 weights for 3 score files"):
        ensemble([a, b, a], [1, 2])


def test_evaluate_cli_and_the_id_order_trap(small_tree: Path, tmp_path: Path) -> None:
    """A perfect submission in devkit IDs scores 0; the same labels as sorted-WNID indices score badly."""
    kit = load_devkit(find_devkit(small_tree))
    train = index_train(small_tree)
    val = index_val(small_tree, kit, train.classes)
    ids = kit.ilsvrc_ids(train.classes)
    right, wrong = tmp_path / "right.txt", tmp_path / "wrong.txt"
    right.write_text(format_submission([[int(ids[c])] for c in val.labels]))
    wrong.write_text(format_submission([[int(c) + 1] for c in val.labels]))  # the classic bug
    gt = str(kit.ground_truth_path())
    out = subprocess.run(SENET + ["evaluate", str(right), "--ground-truth", gt, "--devkit", str(kit.path),
                                  "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r.json").read_text()) == {"top1_error": 0.0, "top5_error": 0.0, "images": len(val)}
    out = subprocess.run(SENET + ["evaluate", str(wrong), "--ground-truth", gt, "--json", str(tmp_path / "w.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "w.json").read_text())["top1_error"] > 0.5

    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\n3\n4 4\n")
    out = subprocess.run(SENET + ["evaluate", str(bad), "--ground-truth", gt], capture_output=True, text=True)
    assert out.returncode == 1 and "line 4: ID 4 guessed more than once" in out.stderr
    assert "Traceback" not in out.stderr


def test_ensemble_cli(small_tree: Path, tmp_path: Path) -> None:
    kit = find_devkit(small_tree)
    k = load_devkit(kit).num_classes
    rng = np.random.default_rng(0)
    a, b = rng.random((5, k)).astype(np.float32), rng.random((5, k)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = subprocess.run(SENET + ["ensemble", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--devkit", str(kit),
                                  "--out", str(tmp_path / "sub.txt"), "--weights", "1", "3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = format_submission(top_ids((a.astype(np.float64) + 3 * b) / 4))
    assert (tmp_path / "sub.txt").read_text() == expected
    np.save(tmp_path / "c.npy", rng.random((5, k + 1)))
    out = subprocess.run(SENET + ["ensemble", str(tmp_path / "a.npy"), str(tmp_path / "c.npy"), "--devkit", str(kit),
                                  "--out", str(tmp_path / "x.txt")], capture_output=True, text=True)
    assert out.returncode == 1 and "c.npy: shape (5, 7)" in out.stderr
