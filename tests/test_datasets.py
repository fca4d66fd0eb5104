"""The ILSVRC2012 layout as make-synthetic writes it and pipeline.datasets / pipeline.devkit read it."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import index_file_list, index_train, index_val, list_images, load_exclusions, tree_cache_folder
from pipeline.devkit import find_devkit, load_devkit, read_ground_truth
from pipeline.errors import DataError
from pipeline.synthetic import class_looks, render
from tests.helpers import SMALL


def test_layout_is_exactly_ilsvrc2012(small_tree: Path) -> None:
    kit = small_tree / "ILSVRC2012_devkit_t12" / "data"
    assert (kit / "meta.mat").is_file() and (kit / "ILSVRC2012_validation_ground_truth.txt").is_file()
    val = list_images(small_tree / "val")
    assert val[0] == "ILSVRC2012_val_00000001.JPEG" and len(val) == SMALL.classes * SMALL.val_per_class
    assert list_images(small_tree / "test")[-1] == f"ILSVRC2012_test_{SMALL.test:08d}.JPEG"
    wnids = sorted(p.name for p in (small_tree / "train").iterdir())
    assert len(wnids) == SMALL.classes and all(w.startswith("n") and len(w) == 9 for w in wnids)
    for w in wnids:
        assert all(f.name.startswith(f"{w}_") and f.suffix == ".JPEG" for f in (small_tree / "train" / w).iterdir())


def test_meta_mat_has_the_real_devkit_structure(small_tree: Path) -> None:
    from scipy.io import loadmat

    synsets = loadmat(str(small_tree / "ILSVRC2012_devkit_t12/data/meta.mat"))["synsets"]
    assert set(synsets.dtype.names) == {"ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                        "wordnet_height", "num_train_images"}
    kit = load_devkit(find_devkit(small_tree))
    assert [s.ilsvrc_id for s in kit.leaves] == list(range(1, SMALL.classes + 1))
    inner = [s for s in kit.synsets if not s.is_leaf]
    assert inner and all(s.ilsvrc_id > SMALL.classes for s in inner)  # non-leaf synsets as in the real devkit
    assert all(s.wnid for s in kit.synsets) and all(s.words for s in kit.leaves)


def test_id_order_is_not_the_sorted_wnid_order(small_tree: Path) -> None:
    """The trap: folder readers number classes by sorted WNID; the devkit by ILSVRC2012_ID."""
    train = index_train(small_tree)
    ids = load_devkit(find_devkit(small_tree)).ilsvrc_ids(train.classes)
    assert sorted(ids.tolist()) == list(range(1, SMALL.classes + 1))
    assert ids.tolist() != list(range(1, SMALL.classes + 1))


def test_val_labels_round_trip_through_the_devkit(small_tree: Path) -> None:
    """Ground truth (IDs) -> WNID -> class index agrees with the manifest's own record of each val image."""
    manifest = json.loads((small_tree / "synthetic.json").read_text())
    id_to_wnid = {c["ilsvrc_id"]: c["wnid"] for c in manifest["classes"]}
    kit = load_devkit(find_devkit(small_tree))
    train = index_train(small_tree)
    val = index_val(small_tree, kit, train.classes)
    truth = read_ground_truth(kit.ground_truth_path())
    assert len(val) == len(truth)
    assert [train.classes[c] for c in val.labels] == [id_to_wnid[i] for i in truth.tolist()]
    assert kit.ilsvrc_ids(train.classes)[val.labels].tolist() == truth.tolist()


def test_train_index_labels_follow_sorted_folders(small_tree: Path) -> None:
    train = index_train(small_tree)
    assert list(train.classes) == sorted(train.classes)
    for f, label in zip(train.files, train.labels):
        assert f.split("/")[1] == train.classes[label] and (small_tree / f).is_file()
    manifest = json.loads((small_tree / "synthetic.json").read_text())
    assert train.class_counts().tolist() == [c["train_images"] for c in manifest["classes"]]



def test_imbalance_makes_a_long_tail(small_tree: Path) -> None:
    counts = index_train(small_tree).class_counts()
    planted = len(json.loads((small_tree / "synthetic.json").read_text())["planted"])
    # the largest class is `imbalance` times the smallest, give or take the planted extra files
    smallest = round(SMALL.train_per_class / SMALL.imbalance)
    assert SMALL.train_per_class <= counts.max() <= SMALL.train_per_class + planted
    assert smallest <= counts.min() <= smallest + planted


def test_classes_survive_flip_and_colour_change() -> None:
    """No two class looks differ only by handedness; images of one look vary in size and colour."""
    looks = class_looks(40)
    assert len(set(looks)) == 40
    imgs = [render(looks[0], np.random.default_rng(i)) for i in range(4)]
    assert len({im.size for im in imgs}) > 1
    assert all(200 <= min(im.size) and max(im.size) <= 500 for im in imgs)
    assert len({tuple(np.asarray(im).reshape(-1, 3).mean(0).round()) for im in imgs}) == 4


def test_file_list_index(tmp_path: Path, small_tree: Path) -> None:
    train = index_train(small_tree)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f} {l}\n" for f, l in zip(train.files[:10], train.labels[:10])))
    idx = index_file_list(lst, small_tree, train.classes)
    assert idx.files == train.files[:10] and idx.labels.tolist() == train.labels[:10].tolist()
    lst.write_text("a.JPEG 0\nb.JPEG x\n")
    with pytest.raises(DataError, match=rf"{lst}: line 2: expected 'relative/path label'"):
        index_file_list(lst, small_tree)


def test_index_cache_is_reused_and_invalidated_when_the_tree_changes(tmp_path: Path, small_tree: Path) -> None:
    root = tmp_path / "tree"
    shutil.copytree(small_tree / "train", root / "train")
    cache = tmp_path / "cache"
    first = index_train(root, cache)
    cache_file = tree_cache_folder(root, cache) / "index.json"
    assert cache_file.is_file()

    # Reused: poison the cached listing (same fingerprint); the poisoned listing comes back, proving no rescan.
    data = json.loads(cache_file.read_text())
    wnid = first.classes[0]
    data["classes"][wnid] = data["classes"][wnid][:1]
    cache_file.write_text(json.dumps(data))
    assert len(index_train(root, cache)) == len(first) - (first.class_counts()[0] - 1)

    # Invalidated: a new file in a class folder changes that folder's mtime.
    time.sleep(0.01)
    shutil.copy(root / first.files[0], root / "train" / wnid / f"{wnid}_new.JPEG")
    again = index_train(root, cache)
    assert len(again) == len(first) + 1 and f"train/{wnid}/{wnid}_new.JPEG" in again.files
    os.remove(root / "train" / wnid / f"{wnid}_new.JPEG")
    assert len(index_train(root, cache)) == len(first)


def test_missing_pieces_are_named(tmp_path: Path, small_tree: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: data folder not found"):
        index_train(tmp_path / "nope")
    with pytest.raises(DataError, match="meta.mat: devkit file not found"):
        find_devkit(tmp_path)
    root = tmp_path / "copy"
    shutil.copytree(small_tree, root)
    gt = root / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("\n".join(gt.read_text().split()[:-1]) + "\n")
    kit = load_devkit(find_devkit(root))
    with pytest.raises(DataError, match=rf"{gt}: {SMALL.classes * SMALL.val_per_class - 1} labels for "):
        index_val(root, kit, index_train(root).classes)
    gt.write_text("1\n2\nseven\n")
    with pytest.raises(DataError, match="line 3: 'seven' is not an integer"):
        read_ground_truth(gt)
    (root / "ILSVRC2012_devkit_t12/data/meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="meta.mat: not a readable MATLAB file"):
        load_devkit(root / "ILSVRC2012_devkit_t12")


def test_exclusions_combine_cache_and_extra_file(tmp_path: Path) -> None:
    root, cache = tmp_path / "r", tmp_path / "c"
    root.mkdir()
    assert load_exclusions(root, cache) == set()
    folder = tree_cache_folder(root, cache)
    folder.mkdir(parents=True)
    (folder / "exclude.txt").write_text("train/a/a_1.JPEG\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("train/b/b_2.JPEG\n\n")
    assert load_exclusions(root, cache, extra) == {"train/a/a_1.JPEG", "train/b/b_2.JPEG"}
    with pytest.raises(DataError, match="missing.txt: cannot read exclusion list"):
        load_exclusions(root, cache, tmp_path / "missing.txt")
