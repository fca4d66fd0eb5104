"""ILSVRC2012 task-1 submission files: writing, validating, scoring and ensembling.

A submission has one line per test image, in ascending file-name order; each line holds up to 5
ILSVRC2012_IDs (1..1000, from the devkit's `meta.mat`) separated by single spaces, most confident
first. An image counts as a top-5 error when its true ID is not among its guesses, and as a top-1
error when the first guess is wrong.

Score matrices (`--scores F.npy`) are float32 arrays of shape (images, classes) in file-name order
whose column j holds the probability of ILSVRC2012_ID j + 1: devkit order, not the model's sorted-WNID
order, so that matrices from models with different class numberings can be averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError

MAX_GUESSES = 5


def top_ids(scores: np.ndarray, k: int = MAX_GUESSES) -> np.ndarray:
    """The k best ILSVRC2012_IDs of each row of a devkit-ordered score matrix, most confident first."""
    k = min(k, scores.shape[1])
    # stable sort of the negated scores: ties go to the lower ID, so the output is deterministic
    return np.argsort(-scores, axis=1, kind="stable")[:, :k] + 1


def format_submission(guesses: np.ndarray | Sequence[Sequence[int]]) -> str:
    """Task-1 file text: one line per image (rows already in file-name order), at most 5 IDs each."""
    return "".join(" ".join(str(int(i)) for i in row[:MAX_GUESSES]) + "\n" for row in guesses)


def write_submission(path: str | Path, guesses: np.ndarray | Sequence[Sequence[int]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_submission(guesses))
    tmp.replace(path)  # a half-written submission never carries the final name


def read_submission(path: str | Path, num_classes: int, num_images: int | None = None) -> list[list[int]]:
    """Parse and validate a submission file; the first bad line is named (`line 4: ...`).

    Args:
        path: the submission file.
        num_classes: IDs must lie in 1..num_classes.
        num_images: the number of lines expected (the test or val set's size), when known.

    Raises:
        DataError: naming the file, the first bad line and what is wrong with it.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read predictions ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file") from None
    rows = []
    for n, line in enumerate(lines, 1):
        fields = line.split(" ")
        if not line.strip():
            raise DataError(f"{path}: line {n}: no guesses (each image needs 1 to {MAX_GUESSES} IDs)")
        if line != line.strip() or "" in fields:
            raise DataError(f"{path}: line {n}: IDs must be separated by single spaces: {line!r}")
        try:
            ids = [int(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not f.lstrip("+-").isdigit())
            raise DataError(f"{path}: line {n}: {bad!r} is not an integer ILSVRC2012_ID") from None
        if len(ids) > MAX_GUESSES:
            raise DataError(f"{path}: line {n}: {len(ids)} guesses; at most {MAX_GUESSES} are allowed")
        out = [i for i in ids if not 1 <= i <= num_classes]
        if out:
            raise DataError(f"{path}: line {n}: ID {out[0]} outside 1..{num_classes}")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{path}: line {n}: ID {dup} guessed more than once")
        rows.append(ids)
    if num_images is not None and len(rows) != num_images:
        raise DataError(f"{path}: {len(rows)} lines for {num_images} images (one line per image, in file-name order)")
    return rows


@dataclass(frozen=True)
class Score:
    """Challenge scores: fractions of images whose true ID is not the first guess / not among the guesses."""

    top1_error: float
    top5_error: float
    images: int

    def as_dict(self) -> dict:
        return {"top1_error": self.top1_error, "top5_error": self.top5_error, "images": self.images}


def score(guesses: Sequence[Sequence[int]], truth: np.ndarray) -> Score:
    """Top-1 and top-5 error exactly as the challenge computes them."""
    if len(guesses) != len(truth):
        raise DataError(f"{len(guesses)} predictions for {len(truth)} ground-truth labels")
    truth = np.asarray(truth).tolist()
    top5_wrong = sum(t not in g for g, t in zip(guesses, truth))
    top1_wrong = sum(g[0] != t for g, t in zip(guesses, truth))
    n = len(truth)
    return Score(top1_wrong / n, top5_wrong / n, n)


def load_scores(paths: Sequence[str | Path], num_classes: int) -> list[np.ndarray]:
    """Score matrices for an ensemble, checked for shape, class count and finiteness."""
    mats = []
    for p in paths:
        try:
            m = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: cannot read a score matrix ({e})") from None
        if m.ndim != 2 or m.shape[1] != num_classes:
            raise DataError(f"{p}: shape {m.shape}; expected (images, {num_classes}) with devkit-ID columns")
        if not np.isfinite(m).all():
            raise DataError(f"{p}: contains NaN or infinite scores")
        if mats and m.shape != mats[0].shape:
            raise DataError(f"{p}: shape {m.shape} differs from {paths[0]}'s {mats[0].shape}")
        mats.append(m.astype(np.float64))
    return mats


def ensemble(mats: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of score matrices (the ILSVRC 2017 winning entry averaged several models)."""
    if not mats:
        raise ValueError("ensemble needs at least one score matrix")
    w = np.ones(len(mats)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(mats),):
        raise ValueError(f"{len(w)} weights for {len(mats)} score files; give one weight per file")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {w.tolist()} must be non-negative with a positive sum")
    return sum(wi * m for wi, m in zip(w, mats)) / w.sum()
