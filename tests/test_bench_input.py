"""`senet bench-input` and `senet preview-augment` end to end on a tiny tree (throughput is never asserted)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from senet.cli import main


def test_bench_input_writes_every_stage_and_the_baseline(small_tree: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench-input", str(small_tree), "--batch-size", "4", "--batches", "2", "--warmup", "1",
               "--threads", "1", "--crop-size", "32", "--baseline", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"device", "threads", "batch_size", "stages", "baseline"} <= set(result)
    assert result["device"] == "cpu" and result["threads"] == 1 and result["batch_size"] == 4
    assert set(result["stages"]) == {"read", "decode", "crop_flip", "full"}
    assert all(v > 0 for v in result["stages"].values()) and result["baseline"]["full"] > 0
    assert Image.open(png).size[0] > 300


def test_bench_input_rejects_unknown_stage(small_tree: Path, capsys) -> None:
    assert main(["bench-input", str(small_tree), "--stages", "decode,warp"]) == 2
    assert "warp" in capsys.readouterr().err


def test_preview_augment_writes_a_grid(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["preview-augment", str(small_tree), "--out", str(out), "--n", "6", "--crop-size", "48"]) == 0
    assert Image.open(out).size == (3 * 52 + 4, 2 * 52 + 4)


def test_bench_input_survives_undecodable_files_and_honours_the_exclusion_list(small_tree: Path, tmp_path: Path) -> None:
    """The baseline meets a truncated file (no check-data run): a warning, no traceback; then excluded."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "senet", "bench-input", str(small_tree), "--stages", "read", "--baseline",
            "--batches", "8", "--warmup", "1", "--batch-size", "8", "--crop-size", "32", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot decode" in done.stderr  # the baseline met a planted bad file and said so
    subprocess.run([sys.executable, "-m", "senet", "check-data", str(small_tree), "--cache-dir", str(tmp_path / "cache"),
                    "--quiet"], capture_output=True, check=False)
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "cannot decode" not in done.stderr, done.stderr[-2000:]


def test_bench_input_measures_each_training_size(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "sizes.json"
    assert main(["bench-input", str(small_tree), "--stages", "full", "--crop-size", "32,48", "--batches", "2",
                 "--warmup", "1", "--batch-size", "4", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {size: r["crop_size"] for size, r in result["by_crop_size"].items()} == {"32": 32, "48": 48}
    assert all(r["stages"]["full"] > 0 for r in result["by_crop_size"].values())
    assert result["input"]["batch_size"] == 4 and result["input"]["runtime"]["py_workers"] == 0
