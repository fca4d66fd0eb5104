"""The ILSVRC2012 devkit: `meta.mat` synsets, WNID <-> ILSVRC2012_ID, validation ground truth.

Folder readers (DALI's `file_root`, ImageFolder) number classes by *sorted WNID*; the devkit numbers
them by ILSVRC2012_ID (1..1000), which is a different order. Every conversion between the two goes
through `Devkit.ilsvrc_ids(classes)`, never through an assumption that they coincide.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError

DEVKIT_DIRNAME = "ILSVRC2012_devkit_t12"
META_FILE = "data/meta.mat"
GROUND_TRUTH_FILE = "data/ILSVRC2012_validation_ground_truth.txt"
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                 "wordnet_height", "num_train_images")


@dataclass(frozen=True)
class Synset:
    """One row of `meta.mat`'s `synsets` struct array."""

    ilsvrc_id: int
    wnid: str
    words: str
    gloss: str
    children: tuple[int, ...] = ()
    wordnet_height: int = 0
    num_train_images: int = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(frozen=True)
class Devkit:
    """The challenge's class list: leaf synsets with ILSVRC2012_IDs 1..K."""

    path: Path
    synsets: tuple[Synset, ...]

    @property
    def leaves(self) -> tuple[Synset, ...]:
        """Leaf synsets (the challenge classes), ordered by ILSVRC2012_ID."""
        return tuple(sorted((s for s in self.synsets if s.is_leaf), key=lambda s: s.ilsvrc_id))

    @property
    def num_classes(self) -> int:
        return len(self.leaves)

    def id_of(self, wnid: str) -> int:
        """ILSVRC2012_ID of a leaf WNID."""
        ids = self._wnid_to_id()
        if wnid not in ids:
            raise DataError(f"{self.path}: WNID {wnid!r} is not a leaf synset of the devkit")
        return ids[wnid]

    def ilsvrc_ids(self, classes: Sequence[str]) -> np.ndarray:
        """Map class index (position in `classes`, a list of WNIDs) -> ILSVRC2012_ID."""
        return np.array([self.id_of(w) for w in classes], dtype=np.int64)

    def wnids_by_id(self) -> dict[int, str]:
        return {s.ilsvrc_id: s.wnid for s in self.leaves}

    def words_of(self, wnid: str) -> str:
        return next((s.words for s in self.synsets if s.wnid == wnid), wnid)

    def _wnid_to_id(self) -> dict[str, int]:
        return {s.wnid: s.ilsvrc_id for s in self.leaves}

    def ground_truth_path(self) -> Path:
        return self.path / GROUND_TRUTH_FILE

    def validation_ground_truth(self) -> np.ndarray:
        """ILSVRC2012_IDs of the val images, in ascending file-name order."""
        return read_ground_truth(self.ground_truth_path(), num_classes=self.num_classes)


def find_devkit(root: str | Path, devkit: str | Path | None = None) -> Path:
    """The devkit folder: `devkit` when given, else ROOT/ILSVRC2012_devkit_t12."""
    path = Path(devkit) if devkit is not None else Path(root) / DEVKIT_DIRNAME
    if not (path / META_FILE).is_file():
        raise DataError(f"{path / META_FILE}: devkit file not found (pass --devkit DIR pointing at {DEVKIT_DIRNAME})")
    return path


def load_devkit(path: str | Path) -> Devkit:
    """Read `data/meta.mat` of a devkit folder."""
    from scipy.io import loadmat  # scipy is slow to import and only this needs it

    path = Path(path)
    meta = path / META_FILE
    if not meta.is_file():
        raise DataError(f"{meta}: devkit file not found")
    try:
        mat = loadmat(str(meta), squeeze_me=True, struct_as_record=True)
    except Exception as e:  # scipy raises several unrelated types for a damaged file
        raise DataError(f"{meta}: not a readable MATLAB file ({e})") from None
    if "synsets" not in mat:
        raise DataError(f"{meta}: has no 'synsets' struct array")
    rows = np.atleast_1d(mat["synsets"])
    missing = [f for f in SYNSET_FIELDS if f not in (rows.dtype.names or ())]
    if missing:
        raise DataError(f"{meta}: synsets lack the fields {missing}")
    synsets = tuple(
        Synset(
            ilsvrc_id=int(r["ILSVRC2012_ID"]),
            wnid=str(r["WNID"]),
            words=str(r["words"]),
            gloss=str(r["gloss"]),
            children=tuple(int(c) for c in np.atleast_1d(r["children"]).ravel()),
            wordnet_height=int(r["wordnet_height"]),
            num_train_images=int(r["num_train_images"]),
        )
        for r in rows
    )
    leaf_ids = sorted(s.ilsvrc_id for s in synsets if s.is_leaf)
    if leaf_ids != list(range(1, len(leaf_ids) + 1)):
        raise DataError(f"{meta}: leaf ILSVRC2012_IDs are not 1..{len(leaf_ids)}")
    return Devkit(path=path, synsets=synsets)


def write_devkit(path: str | Path, synsets: Sequence[Synset], ground_truth: Sequence[int]) -> None:
    """Write `data/meta.mat` (a MATLAB struct array, as the real devkit) and the val ground truth."""
    from scipy.io import savemat

    data = Path(path) / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = np.zeros((len(synsets), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for i, s in enumerate(synsets):
        rows[i, 0] = (
            np.array([[s.ilsvrc_id]], dtype=np.uint16),
            s.wnid,
            s.words,
            s.gloss,
            np.array([[len(s.children)]], dtype=np.uint8),
            np.array([list(s.children)], dtype=np.uint16).reshape(1, -1),
            np.array([[s.wordnet_height]], dtype=np.uint8),
            np.array([[s.num_train_images]], dtype=np.uint16),
        )
    savemat(str(data / "meta.mat"), {"synsets": rows})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ground_truth))


def read_ground_truth(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """One ILSVRC2012_ID per line; returns them as int64, checking the range when `num_classes` is known."""
    path = Path(path)
    try:
        lines = path.read_text().split()
    except OSError as e:
        raise DataError(f"{path}: cannot read ground truth ({e.strerror})") from None
    try:
        ids = np.array([int(x) for x in lines], dtype=np.int64)
    except ValueError:
        bad = next(i for i, x in enumerate(lines) if not x.lstrip("-").isdigit())
        raise DataError(f"{path}: line {bad + 1}: {lines[bad]!r} is not an integer ILSVRC2012_ID") from None
    upper = num_classes if num_classes is not None else ids.max(initial=1)
    out = np.flatnonzero((ids < 1) | (ids > upper))
    if out.size:
        raise DataError(f"{path}: line {out[0] + 1}: ID {ids[out[0]]} outside 1..{upper}")
    return ids
