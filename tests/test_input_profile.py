"""The input profiler: the stall alarm in training, `bench-input --tune` and `bench-train`'s bound.

A run starved of input for real (large JPEGs, one DALI thread, no workers, a tiny model at a small crop)
warns at most once per log window, naming its ranks, node and a setting to change; `bench-train` calls
that config input-bound and a heavy model on small images compute-bound; `--tune` writes a settings
file that `senet train` and `senet submit` accept. The search's decision rule is proven with a fake
measurer whose noise the test controls (the well-fed run is in test_engine.py: resident tensors).
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.synthetic import SyntheticSpec, make_synthetic
from pipeline.tune import BudgetTooSmall, Candidate, InputSettings, beats_noise, split_candidates, tune
from senet.cli import main
from tests.helpers import ROOT
from training.metrics import read_metrics
from training.stall import InputContext, RankWindow, diagnose, stall_message

KNOBS = ("data.threads", "data.py_workers", "data.prefetch", "data.hw_decoder_load", "a pack", "data.stage_dir",
         "slurm.cpus_per_task")
STARVE = ["model.num_classes=2", "train.device=cpu", "train.precision=fp32", "data.dtype=float32", "data.threads=1",
          "data.py_workers=0", "data.crop_size=32", "train.batch_size=4", "data.samples_per_epoch=64"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 8 photographs of 1.6-2 kpx a side (about 1 MB each): decoding them is the work."""
    root = tmp_path_factory.mktemp("large") / "data"
    make_synthetic(root, SyntheticSpec(classes=2, train_per_class=8, val_per_class=0, test=0, seed=3, min_side=1600,
                                       max_side=2000))
    return root


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  arch: se_resnext_tiny\n  channels_last: false\ntrain:\n  seed: 3\n")
    return path


@pytest.fixture
def torch_settings_kept():
    """bench-train in this process sets torch's threads and determinism (training.build): put them back."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


# --- the search: its decision rule under a measurer whose noise the test sets --------------------------------

class FakeMeasurer:
    """Images/s = the candidate's true rate + noise cycling +a, -a, 0 (each candidate's spread is exactly 2a);
    every run advances a fake clock by one second."""

    def __init__(self, true: dict[InputSettings, float], default_rate: float, amplitude: float) -> None:
        self.true, self.default_rate, self.amplitude = true, default_rate, amplitude
        self.now, self.calls = 0.0, []
        self.counts: dict[InputSettings, int] = {}

    def clock(self) -> float:
        return self.now

    def __call__(self, s: InputSettings) -> float:
        self.now += 1.0
        self.calls.append(s)
        k = self.counts[s] = self.counts.get(s, -1) + 1
        return self.true.get(s, self.default_rate) + (self.amplitude, -self.amplitude, 0.0)[k % 3]


DEFAULT = InputSettings(threads=2, py_workers=2, prefetch=2)  # training's defaults on a 4-CPU share
FAST = InputSettings(threads=4, py_workers=0, prefetch=2)


@pytest.mark.parametrize("fast_rate, recommended", [(100.0, False), (104.0, False), (110.0, False), (130.0, True)])
def test_a_change_is_recommended_only_when_it_beats_the_measured_noise(fast_rate: float, recommended: bool,
                                                                       tmp_path: Path) -> None:
    """Noise +-5 img/s (spread 10): a 4 or a 10 img/s lead keeps the defaults, a 30 img/s lead wins."""
    fake = FakeMeasurer({FAST: fast_rate}, default_rate=100.0, amplitude=5.0)
    result = tune(DEFAULT, 4, fake, budget_s=1000, repeats=3, clock=fake.clock)
    assert result.noise == pytest.approx(10.0)
    assert result.recommended_change is recommended
    assert result.best.settings == (FAST if recommended else DEFAULT)
    report = result.to_json()
    assert report["default"] == {"settings": {"threads": 2, "py_workers": 2, "prefetch": 2}, "images_per_s": 100.0}
    assert report["best"]["settings"] == result.best.settings.as_dict() and report["best"]["images_per_s"] > 0
    assert len(report["candidates"]) == len(result.candidates) >= 6 and all(len(c["runs"]) >= 3 for c in report["candidates"])
    medians = [c["images_per_s"] for c in report["candidates"]]
    assert medians == sorted(medians, reverse=True)  # best first
    json.dumps(report)


def test_the_rule_compares_medians_against_the_larger_spread() -> None:
    default = Candidate(DEFAULT, [100, 90, 110])
    assert beats_noise(Candidate(FAST, [121, 121, 121]), default) == (True, 20)
    assert beats_noise(Candidate(FAST, [120, 120, 120]), default) == (False, 20)  # a tie with the noise is no win
    assert beats_noise(Candidate(FAST, [200, 150, 125]), default) == (False, 75)  # a wild candidate's own spread
    assert beats_noise(Candidate(DEFAULT, [500, 500]), default)[0] is False  # the defaults never "beat" themselves


def test_the_search_interleaves_keeps_the_defaults_in_every_stage_and_stays_within_its_budget() -> None:
    fake = FakeMeasurer({FAST: 130.0}, default_rate=100.0, amplitude=5.0)
    result = tune(DEFAULT, 4, fake, budget_s=22, repeats=3, clock=fake.clock)
    assert fake.now <= 22  # one run costs a second: the budget holds the warm-up, 9 split runs, 12 prefetch runs
    assert fake.calls[0] == DEFAULT  # the warm-up run (not counted)
    split = fake.calls[1:1 + 3 * 3]  # stage 1: the defaults (workers 2) and workers 0 and 1, three rounds
    for r in range(3):
        assert len(set(split[3 * r:3 * r + 3])) == 3  # each round measures every candidate once
    assert split[0] != split[3] != split[6]  # in a rotated order
    assert all(s.threads + s.py_workers == 4 for s in split)  # within the share
    assert len(result.default.runs) == 6  # measured again beside the prefetch candidates
    assert result.skipped == ["prefetch: 1 of 3 candidates (budget): threads 4, py_workers 0, prefetch 4"]
    fake = FakeMeasurer({}, 100.0, 5.0)
    with pytest.raises(BudgetTooSmall, match="one run took 1.0 s"):
        tune(DEFAULT, 4, fake, budget_s=4, repeats=3, clock=fake.clock)


def test_gpu_searches_the_hardware_decoder_share_and_never_the_batch_size() -> None:
    default = InputSettings(threads=6, py_workers=2, prefetch=2, hw_decoder_load=0.65)
    fake = FakeMeasurer({}, default_rate=1000.0, amplitude=10.0)
    tune(default, 8, fake, budget_s=10_000, repeats=2, gpu=True, clock=fake.clock)
    assert {s.hw_decoder_load for s in fake.calls} == {0.0, 0.4, 0.65, 0.8, 1.0}
    assert set(InputSettings.__dataclass_fields__) == {"threads", "py_workers", "prefetch", "hw_decoder_load"}
    assert [(s.threads, s.py_workers) for s in split_candidates(8, default)] == [(8, 0), (7, 1), (6, 2), (4, 4)]


# --- the alarm's reading: which part set the pace and what to try first -------------------------------------------

def context(**kw) -> InputContext:
    base = dict(device="cpu", threads=2, py_workers=0, cpus=2, prefetch=2, hw_decoder_load=0.65, data="/data/train",
                packed=False, staged=False, batch_size=64, crop_size=224)
    return InputContext(**{**base, **kw})


def window(rank: int = 0, node: str = "n1", **kw) -> RankWindow:
    """20 steps of 0.1 s, 40 % of it waiting, and the loader's times per batch as given (seconds per batch)."""
    per = {k: kw.pop(k, 0.0) * 20 for k in ("read_s", "graph_s", "copy_s", "colour_s")}
    base = dict(wait_s=0.8, elapsed_s=2.0, steps=20, batches=20, burst=0.15)
    return RankWindow(rank, node, **{**base, **per, **kw})


def test_diagnosis_names_the_part_that_sets_the_pace_and_the_setting_to_try_first() -> None:
    inline_reads = diagnose(window(read_s=0.03, graph_s=0.04), context())
    assert inline_reads.limit == "reads" and inline_reads.knob == "data.py_workers=2"
    slow_disk = diagnose(window(read_s=0.32, graph_s=0.04), context(py_workers=4, threads=4, cpus=8))
    assert slow_disk.knob.startswith("a pack") and slow_disk.then == ("data.py_workers=8",)
    packed = diagnose(window(read_s=0.32, graph_s=0.04), context(py_workers=4, threads=4, cpus=8, packed=True))
    assert packed.knob.startswith("data.stage_dir")
    graph = diagnose(window(read_s=0.001, graph_s=0.04), context(threads=1, cpus=4))
    assert graph.limit == "graph" and graph.knob == "data.threads=4"
    bursty = diagnose(window(read_s=0.001, graph_s=0.04, burst=0.8), context())
    assert bursty.knob.startswith("data.prefetch=4")
    gpu = diagnose(window(read_s=0.001, graph_s=0.04), context(device="gpu"))
    assert gpu.knob.startswith("data.hw_decoder_load")
    busy_gpu = diagnose(window(read_s=0.001, graph_s=0.001, copy_s=0.02, colour_s=0.02), context(device="gpu"))
    assert busy_gpu.limit == "after" and not busy_gpu.knob and "busy GPU" in busy_gpu.verdict
    assert diagnose(window(batches=0), context()).limit == "unknown"


def test_the_warning_names_the_stalled_ranks_by_node_with_their_share_and_leaves_the_fed_ones_out() -> None:
    windows = [window(0, "gpu-a", graph_s=0.04), window(1, "gpu-a", graph_s=0.04, wait_s=0.5),
               window(2, "gpu-a", wait_s=0.01), window(5, "gpu-b", graph_s=0.04, wait_s=0.3)]
    message = stall_message(windows, 0.05, context(threads=1, cpus=2), last_step=100)
    assert message.startswith("input stall in steps 81-100: ranks 0-1 on gpu-a, rank 5 on gpu-b waited for data "
                              "15%-40% of the time (train.data_wait_warn 5%)")
    assert "rank 0's loader" in message and "try data.threads=2 first" in message
    assert "senet bench-input /data/train --device cpu --batch-size 64" in message and "--tune" in message
    assert stall_message(windows, 0.5, context(), last_step=100) is None
    started = RankWindow(0, "n", wait_s=1.05, elapsed_s=3.0, steps=20, startup_s=1.0)  # an epoch's pipeline start
    assert started.fraction == pytest.approx(0.05 / 2.0)


# --- for real: a starved run, bench-train's two verdicts, a tuned settings file -----------------------------------

@pytest.mark.slow
def test_tune_writes_a_set_file_that_a_starved_training_run_accepts_and_warns_once_per_window(
        small_tree: Path, large_jpegs: Path, tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tuned, report = tmp_path / "tuned.set", tmp_path / "tune.json"
    code = main(["bench-input", str(small_tree), "--tune", "--cpus", "2", "--batch-size", "4", "--crop-size", "32",
                 "--batches", "2", "--warmup", "1", "--repeats", "2", "--budget-s", "60", "--set-out", str(tuned),
                 "--json", str(report), "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(report.read_text())
    for key in ("default", "best"):
        assert set(result[key]) == {"settings", "images_per_s"} and result[key]["images_per_s"] > 0
        assert set(result[key]["settings"]) == {"threads", "py_workers", "prefetch"}
    assert result["default"]["settings"] == {"threads": 1, "py_workers": 2, "prefetch": 2}  # training's, on 2 CPUs
    assert len(result["candidates"]) >= 3 and "<- defaults" in printed
    lines = [line for line in tuned.read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"data.{k}={v}" for k, v in result["best"]["settings"].items()]

    # The tuned file, then --set lines that starve the run on purpose (a --set wins over the file).
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "senet", "train", str(tiny_config), "--nproc", "2", "--out", str(out),
                           "--set-file", str(tuned), *sets(*STARVE, f"data.root={large_jpegs}", "train.epochs=2",
                                                            "train.log_every=4", f"data.cache_dir={tmp_path / 'cache'}")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = (out / "config.yaml").read_text()
    assert f"prefetch: {result['best']['settings']['prefetch']}" in resolved and "threads: 1" in resolved
    warnings = [line for line in done.stderr.splitlines() if "input stall" in line]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert 1 <= len(warnings) <= len(rows)  # at most one per log window, not one per step
    node = socket.gethostname()
    for line in warnings:
        assert line.startswith("WARNING senet.train: input stall in steps ")
        assert re.search(rf"ranks? [0-9,-]+ on {re.escape(node)} waited for data \d+%", line), line
        assert any(knob in line for knob in KNOBS) and "senet bench-input" in line
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"waited for data \d+\.\d% of the training time", summary), summary
    print(warnings[0])  # the warning as the user sees it (pytest -s)


@pytest.mark.slow
def test_bench_train_calls_a_starved_config_input_bound_and_a_heavy_model_compute_bound(
        large_jpegs: Path, small_tree: Path, tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, torch_settings_kept: None) -> None:
    """A 1-CPU share, as a Slurm task with --cpus-per-task=1 gets: one DALI thread and one torch thread. (With
    torch's threads on the cores DALI decodes on, a CPU step slows down instead of waiting: bound_verdict.)"""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    starved = tmp_path / "starved.json"
    code = main(["bench-train", str(tiny_config), *sets(*STARVE, f"data.root={large_jpegs}", "train.batch_size=8",
                                                       f"data.cache_dir={tmp_path / 'cache'}"),
                 "--batches", "3", "--warmup", "1", "--json", str(starved)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(starved.read_text())
    assert result["bound"] == "input" and result["data_wait_fraction"] > 0.05, out
    assert out.strip().splitlines()[-1].startswith("input-bound: ") and "try " in out
    assert any(knob in result["knob"] for knob in KNOBS)

    heavy = tmp_path / "heavy.yaml"
    heavy.write_text("model:\n  arch: se_resnext50_32x4d\n  channels_last: false\n")
    fed = tmp_path / "fed.json"
    code = main(["bench-train", str(heavy), *sets(*STARVE, f"data.root={small_tree}", "model.num_classes=6",
                                                  "data.crop_size=64", f"data.cache_dir={tmp_path / 'cache'}"),
                 "--batches", "3", "--warmup", "1", "--json", str(fed)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(fed.read_text())
    assert result["bound"] == "compute" and result["knob"] == "", out
    assert out.strip().splitlines()[-1].startswith("compute-bound: ")


def test_submit_applies_a_settings_file_and_a_bad_line_is_one_error_naming_it(
        tiny_config: Path, small_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.set"
    good.write_text("# from bench-input --tune\ndata.threads=3\ndata.py_workers=1\n\nslurm.cpus_per_task=4\n")
    assert main(["submit", str(tiny_config), "--set-file", str(good), "--dry-run", "--set", "slurm.gpus_per_node=2",
                 "--set", f"data.root={small_tree}"]) == 0
    assert "--cpus-per-task=4" in capsys.readouterr().out
    bad = tmp_path / "bad.set"
    bad.write_text("data.threads=2\ndata.threads=0\n")
    for command in ("train", "submit"):
        assert main([command, str(tiny_config), "--set-file", str(bad), "--set", f"data.root={small_tree}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{bad}:2" in err[0] and "data.threads" in err[0], err
    bad.write_text("threads 2\n")
    assert main(["train", str(tiny_config), "--set-file", str(bad)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err
