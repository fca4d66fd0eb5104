"""A run that changes its number of processes keeps its recipe: `senet train` end to end, real gloo processes.

A 2-process run SIGKILLed mid-epoch and resumed on ONE process ends bit-identical to the uninterrupted
2-process run, with the same learning rate at every step and step and epoch counters that continue; a
run of 4 virtual ranks started on 2 processes and resumed on 4 ends bit-identical to its uninterrupted
self; 3 processes cannot host 2 or 4 virtual ranks (one line, exit 2). Every process runs torch on one
thread (`train.torch_threads`): torch's CPU convolution backward splits its sums by thread.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.synthetic import SyntheticSpec, make_synthetic
from training.metrics import read_metrics

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs DALI")

# 96 samples per epoch, a global batch of 16: 6 steps per epoch, 18 in all; a checkpoint every 4 steps
RECIPE = ("model.num_classes=4", "train.device=cpu", "train.precision=fp32", "train.torch_threads=1", "data.dtype=float32",
          "data.py_workers=0", "data.threads=1", "data.crop_size=32", "data.samples_per_epoch=96", "train.epochs=3",
          "train.checkpoint_every=4", "train.log_every=1", "optim.lr=0.2", "optim.reference_batch=16",
          "optim.warmup_epochs=1", "optim.step_epochs=2")
STEPS, PER_EPOCH = 18, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("virtual") / "data"
    make_synthetic(root, SyntheticSpec(classes=4, train_per_class=20, val_per_class=4, test=0, seed=2, min_side=40,
                                       max_side=64))
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  arch: se_resnext_tiny\n  channels_last: false\ntrain:\n  seed: 5\n")
    return path


def senet_train(config: Path, data: Path, out: Path, nproc: int, *extra: str, **popen) -> subprocess.Popen:
    sets = [*RECIPE, f"data.root={data}", f"data.cache_dir={out.parent / 'cache'}", *extra]
    return subprocess.Popen([sys.executable, "-m", "senet", "train", str(config), "--nproc", str(nproc), "--out", str(out),
                             *[a for s in sets for a in ("--set", s)]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def killed_mid_epoch(config: Path, data: Path, out: Path, nproc: int, *extra: str) -> int:
    """Start a run, SIGKILL it (launcher, ranks, DALI) once a checkpoint inside the second epoch has landed; its step."""
    proc = senet_train(config, data, out, nproc, *extra, start_new_session=True)
    deadline = time.monotonic() + 200
    while not landed_after(out, PER_EPOCH) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert PER_EPOCH < step < STEPS and step % PER_EPOCH, step  # inside an epoch
    return step


def landed_after(out: Path, step: int) -> bool:
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return any(r.get("event") == "checkpoint" and r["step"] > step for r in rows)


def assert_bit_identical(a_dir: Path, b_dir: Path) -> tuple[dict, dict]:
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different  # BN running statistics included: virtual rank 0's in both
    momenta = [(x["momentum_buffer"], y["momentum_buffer"]) for x, y in
               zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
    assert momenta and all(torch.equal(x, y) for x, y in momenta)
    return a, b


def shapes(out: Path) -> list[tuple[int, int, int, int]]:
    """(step, world size, virtual ranks, hosted) of each start, from RUN/shapes.jsonl."""
    rows = [json.loads(line) for line in (out / "shapes.jsonl").read_text().splitlines()]
    return [(r["step"], r["world_size"], r["virtual_ranks"], r["hosted"]) for r in rows]


@needs_dali
@pytest.mark.slow
def test_a_2_process_run_killed_mid_epoch_continues_on_1_process_bit_identical_with_its_schedule_and_counters(
        data: Path, config: Path, tmp_path: Path) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    finished(senet_train(config, data, whole, 2, "train.batch_size=8"))
    killed_at = killed_mid_epoch(config, data, part, 2, "train.batch_size=8")
    said = finished(senet_train(config, data, part, 1, "train.batch_size=8"))  # the same command, one process

    assert f"resumed from step {killed_at}" in said
    assert "2 virtual ranks on 1 process (2 each), global batch 16 (8 per virtual rank), peak lr 0.2, 6 steps/epoch" in said
    a, b = assert_bit_identical(whole, part)
    assert (a["world_size"], a["virtual_ranks"], a["global_batch"]) == (2, 2, 16)
    assert (b["world_size"], b["virtual_ranks"], b["global_batch"]) == (1, 2, 16)
    assert b["scheduler"]["samples"] == STEPS * 16

    def rows(out: Path) -> list[dict]:
        return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    ours, theirs = rows(part), rows(whole)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # every step once, none negative, none repeated
    assert [(r["step"], r["epoch"], r["lr"]) for r in ours] == [(r["step"], r["epoch"], r["lr"]) for r in theirs]
    assert len({r["lr"] for r in ours}) > 3  # warm-up, then the step decay: the schedule really moves
    assert [line.split(": loss")[0].split("step ")[-1] for line in said.splitlines() if " step " in line and ": loss" in line] \
        == [f"{s - 2 * PER_EPOCH if s > 2 * PER_EPOCH else s - PER_EPOCH}/{PER_EPOCH}" for s in range(killed_at + 1, STEPS + 1)]
    assert shapes(part) == [(0, 2, 2, 1), (killed_at, 1, 2, 2)]
    resolved = (part / "config.yaml").read_text()
    assert "virtual_ranks: 2" in resolved and "global_batch: 16" in resolved


@needs_dali
@pytest.mark.slow
def test_4_virtual_ranks_started_on_2_processes_continue_on_4_bit_identical_and_3_processes_are_refused(
        data: Path, config: Path, tmp_path: Path) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    four = ("train.batch_size=4", "train.virtual_ranks=4")
    finished(senet_train(config, data, whole, 2, *four))
    killed_at = killed_mid_epoch(config, data, part, 2, *four)
    said = finished(senet_train(config, data, part, 4, "train.batch_size=4"))  # the run's virtual ranks: from its checkpoint
    assert "x 4 (fp32, DDP), 4 ranks, global batch 16 (4 per virtual rank)" in said
    assert_bit_identical(whole, part)
    assert shapes(part) == [(0, 2, 4, 2), (killed_at, 4, 4, 1)]

    for out, extra in ((part, ()), (tmp_path / "new", ("train.virtual_ranks=2",))):  # a resume, and a fresh start
        proc = senet_train(config, data, out, 3, "train.batch_size=4", *extra)
        said, _ = proc.communicate(timeout=300)
        errors = [line for line in said.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert proc.returncode == 2 and len(errors) == 1, said[-3000:]
        virtual = 4 if out == part else 2
        assert errors[0].startswith(f"senet train: error: 3 processes cannot host this run's {virtual} virtual ranks")
        assert f"use {'1, 2 or 4' if virtual == 4 else '1 or 2'} processes" in errors[0]
    assert not (tmp_path / "new").exists()  # refused before any process started
