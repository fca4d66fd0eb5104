"""`make gpu-check DEVICE=cpu`: the GPU check script itself works, end to end, on a machine without a GPU.

The same sections as on a GPU with small sizes: the `gpu`-marked tests on the CPU device, every input
stage, the hardware-decoder comparison, bench-train (eager and compiled), a 2-rank run, train +
predict; then a rerun of one section keeps the others' results.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu_and_reruns_one(tmp_path: Path) -> None:
    out = tmp_path / "check"
    make = ["make", "-s", "gpu-check", "DEVICE=cpu", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}"]
    done = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    result = json.loads((out / "result.json").read_text())
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + json.dumps(result["sections"])
    assert all(s["status"] == "ok" for s in result["sections"].values()), result["sections"]
    assert result["device"] == "cpu" and result["versions"]["dali"] and result["versions"]["torch"]
    assert result["shm_gib"] > 0 and result["card"]
    assert result["tests"]["passed"] >= 1 and result["tests"]["failed"] == 0
    assert set(result["input"]) == {"read", "decode", "crop_flip", "full"} and all(v > 0 for v in result["input"].values())
    assert set(result["decode_hw"]) == {"0.0", "0.65", "1.0"}
    eager, compiled = result["train"]
    assert eager["compile"] is False and eager["real_images_per_s"] > 0 and 0 <= eager["stall_fraction"] <= 1
    assert compiled["compile"] is True or str(compiled["compile"]).startswith("unavailable")
    assert result["checkpoint_write_s"] > 0 and result["predict_images_per_s"] > 0
    assert result["predict_top1"] == result["engine_top1"]  # exact on the CPU
    assert (out / "RESULT.md").read_text().startswith("# gpu-check on ")

    before = result["sections"]["train"]
    done = subprocess.run(make + ["SECTIONS=env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    again = json.loads((out / "result.json").read_text())
    assert done.returncode == 0 and again["sections"]["train"] == before and again["train"] == result["train"]
    bad = subprocess.run(make + ["SECTIONS=warp"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown section" in bad.stderr
