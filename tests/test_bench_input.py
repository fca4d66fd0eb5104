"""`senet bench-input` and `senet preview-augment` end to end on a tiny tree (throughput is never asserted)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from training.cli import main


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
