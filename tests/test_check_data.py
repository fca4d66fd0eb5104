"""`senet check-data` finds exactly the planted bad files, accepts the odd-but-valid ones, and says so."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.check import check_data
from pipeline.datasets import index_train, load_exclusions

SENET = [sys.executable, "-m", "senet"]


def planted(root: Path) -> dict[str, dict]:
    return {p["path"]: p for p in json.loads((root / "synthetic.json").read_text())["planted"]}


def test_finds_exactly_the_undecodable_files_and_accepts_the_odd_ones(small_tree: Path, tmp_path: Path) -> None:
    report = check_data(small_tree, cache_dir=tmp_path / "cache", exclude_out=tmp_path / "exclude.txt")
    plants = planted(small_tree)
    assert {b["path"] for b in report.undecodable} == {p for p, v in plants.items() if not v["decodable"]}
    kinds = {o["path"]: o["kind"] for o in report.odd}
    assert set(kinds) == {p for p, v in plants.items() if v["decodable"]}
    assert sorted(kinds.values()) == ["CMYK JPEG", "PNG file named .JPEG", "grayscale"]
    assert not report.ok and not report.problems  # the bad files are excluded; nothing else is wrong
    listed = (tmp_path / "exclude.txt").read_text().split()
    assert sorted(listed) == sorted(b["path"] for b in report.undecodable)


def test_loaders_find_the_exclusion_list_under_the_cache_dir(small_tree: Path, tmp_path: Path) -> None:
    report = check_data(small_tree, cache_dir=tmp_path / "cache")
    excluded = load_exclusions(small_tree, tmp_path / "cache")
    assert excluded == {b["path"] for b in report.undecodable}
    train = index_train(small_tree).without(excluded)
    assert not excluded & set(train.files)


def test_counts_and_devkit_consistency(small_tree: Path, tmp_path: Path) -> None:
    report = check_data(small_tree, cache_dir=tmp_path / "c")
    train = report.splits["train"]
    assert train["images"] == len(index_train(small_tree)) and train["classes"] == 6
    assert train["max_per_class"] / train["min_per_class"] == pytest.approx(train["imbalance"])
    assert report.splits["val"]["images"] == 24 and report.splits["test"]["images"] == 8
    assert report.devkit and report.devkit.endswith("ILSVRC2012_devkit_t12")


def test_devkit_inconsistencies_are_problems(small_tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(small_tree, root)
    for p, v in planted(root).items():
        if not v["decodable"]:
            (root / p).unlink()
    stray = root / "train" / "n00000042"
    stray.mkdir()
    shutil.copy(next((root / "val").iterdir()), stray / "n00000042_1.JPEG")
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    report = check_data(root, cache_dir=tmp_path / "c")
    assert not report.undecodable
    assert any("training folders are not devkit classes, e.g. ['n00000042']" in p for p in report.problems)
    assert any("23 val images" in p for p in report.problems)


def test_cli_exit_codes_and_json(small_tree: Path, tmp_path: Path) -> None:
    out = subprocess.run(SENET + ["check-data", str(small_tree), "--cache-dir", str(tmp_path / "c"),
                                  "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "UNDECODABLE" in out.stdout and "odd but valid" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] is False and len(data["undecodable"]) == 2

    clean = tmp_path / "clean"
    shutil.copytree(small_tree, clean)
    for p, v in planted(clean).items():
        if not v["decodable"]:
            (clean / p).unlink()
    out = subprocess.run(SENET + ["check-data", str(clean), "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: ready for training" in out.stdout

    out = subprocess.run(SENET + ["check-data", str(tmp_path / "absent")], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0
    assert f"{tmp_path / 'absent'}: data folder not found" in out.stderr and "Traceback" not in out.stderr


def test_make_synthetic_cli(tmp_path: Path) -> None:
    out = subprocess.run(SENET + ["make-synthetic", str(tmp_path / "d"), "--classes", "3", "--train-per-class", "4",
                                  "--val-per-class", "2", "--test", "2", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "3 classes, 12 train images" in out.stdout
    again = subprocess.run(SENET + ["make-synthetic", str(tmp_path / "d")], capture_output=True, text=True)
    assert again.returncode == 1 and "already holds a data set" in again.stderr
    bad = subprocess.run(SENET + ["make-synthetic", str(tmp_path / "e"), "--imbalance", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--imbalance 0.5" in bad.stderr and "Traceback" not in bad.stderr
