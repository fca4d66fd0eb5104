"""`senet complexity` prints the table and writes the documented JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SENET = [sys.executable, "-m", "senet"]


def test_complexity_json_and_table(tmp_path: Path) -> None:
    out = subprocess.run(SENET + ["complexity", "se_resnet_tiny", "--baseline", "se_resnext_tiny", "--input-size", "64",
                                  "--repeats", "3", "--json", str(tmp_path / "c.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report) == {"model", "baseline", "latency_ratio"}
    for row in (report["model"], report["baseline"]):
        assert set(row) == {"name", "params", "macs", "latency_ms"} and row["params"] > 0 and row["macs"] > 0
    assert report["latency_ratio"] == report["model"]["latency_ms"] / report["baseline"]["latency_ms"]
    assert "se_resnet_tiny / se_resnext_tiny: latency x" in out.stdout


def test_unknown_model_is_a_usage_error() -> None:
    out = subprocess.run(SENET + ["complexity", "se_resnext50"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model 'se_resnext50'; known:" in out.stderr and "Traceback" not in out.stderr
