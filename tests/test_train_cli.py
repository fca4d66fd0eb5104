"""`senet train` end to end: real gloo processes, real DALI, make-synthetic data.

Two processes with class-aware sampling and full augmentation learn the synthetic task; a run
SIGKILLed after a checkpoint and resumed with `--resume auto` ends bit-identical to an uninterrupted
one; configuration mistakes are one line and exit 2; a rank killed or stopped (SIGSTOP) is named with
its host and last step, and the run ends at once or within `train.dist_timeout_s`; a slow rank is named.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.synthetic import SyntheticSpec, make_synthetic
from models import create_model
from senet.cli import main
from tests.helpers import LEARN_EPOCHS, fit_in_memory, flip_a_bit, process_settings_kept, truncate
from training.checkpoint import load_checkpoint
from training.checkpoint_folder import checkpoint_name
from training.metrics import read_metrics
from training.ranks import DistInfo, free_port

needs_loader = pytest.mark.skipif(importlib.util.find_spec("pipeline.loader") is None
                                  or importlib.util.find_spec("nvidia.dali") is None,
                                  reason="needs DALI and pipeline.loader")

CLASSES = 6
BASE = [f"model.num_classes={CLASSES}", "train.device=cpu", "data.dtype=float32", "data.py_workers=1", "data.threads=1",
        "train.precision=fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes of small images (64-112 px), ILSVRC layout with a devkit."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, SyntheticSpec(classes=CLASSES, train_per_class=100, val_per_class=10, test=0, seed=1,
                                       min_side=64, max_side=112))
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  arch: se_resnext_tiny\n  channels_last: false\ntrain:\n  seed: 3\n")
    return path


def senet(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "senet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def settings(data: Path, tmp: Path, *extra: str) -> list[str]:
    items = [*BASE, f"data.root={data}", f"data.cache_dir={tmp / 'cache'}", *extra]
    return [a for item in items for a in ("--set", item)]


@needs_loader
@pytest.mark.slow
def test_two_processes_learn_the_synthetic_task(learned: dict[str, Path]) -> None:
    """Two gloo processes, the demo recipe, 4 epochs (the `learned` fixture)."""
    out = learned["run"]
    rows = read_metrics(out / "metrics.jsonl")
    val = [r for r in rows if "val_top1" in r]
    train = [r for r in rows if "loss" in r]
    assert len(val) == LEARN_EPOCHS and val[-1]["val_images"] == CLASSES * 10  # every val image counted exactly once
    assert val[-1]["val_top1"] >= 0.5, val  # chance is 1/6
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in val)
    for r in train:
        assert {"step", "epoch", "loss", "lr", "images_per_s", "data_wait_fraction"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "curves.png", "config.yaml", "config.given.yaml"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["arch"] == "se_resnext_tiny" and ckpt["num_classes"] == CLASSES and len(ckpt["classes"]) == CLASSES
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["config"]["data"]["root"] == str(learned["data"]) and ckpt["world_size"] == 2
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)  # the better of the raw and EMA weights
    assert best["best_top1"] == max(max(r["val_top1"], r["val_top1_ema"]) for r in val)


def checkpointed_after(out: Path, step: int) -> bool:
    """Whether rank 0 has logged a checkpoint written after `step` (it logs once the file is whole)."""
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return any(r.get("event") == "checkpoint" and r["step"] > step for r in rows)


@needs_loader
@pytest.mark.slow
def test_sigkill_after_a_size_change_then_resume_auto_equals_the_uninterrupted_run(data: Path, config: Path,
                                                                                   tmp_path: Path) -> None:
    """Progressive resizing (32, 48, 64 px over 3 epochs) and a weight EMA: killed mid-epoch after the first size
    change, resumed, the parameters, momenta and EMA end bit-identical to the uninterrupted run's."""
    # 2 ranks x 8 = 16 per step, 160 samples per epoch -> 10 steps per epoch, 30 in all; checkpoints every 7 steps.
    common = settings(data, tmp_path, "data.crop_size=64", "data.crop_size_start=32", "data.crop_size_multiple=16",
                      "data.crop_ramp_start=0", "data.crop_ramp_end=2", "data.samples_per_epoch=160", "train.epochs=3",
                      "train.batch_size=8", "train.checkpoint_every=7", "train.log_every=2", "train.ema_decay=0.9",
                      "train.ema_every=2", "optim.lr=0.1", "optim.reference_batch=16", "optim.warmup_epochs=0.5")
    whole = tmp_path / "whole"
    code, text = finish(senet("train", str(config), "--nproc", "2", "--out", str(whole), *common), timeout=300)
    assert code == 0, text[-3000:]

    part = tmp_path / "part"
    proc = senet("train", str(config), "--nproc", "2", "--out", str(part), *common, start_new_session=True)
    deadline = time.monotonic() + 200
    while not checkpointed_after(part, 10) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, both ranks and their DALI workers, mid-run
    proc.communicate()
    killed_at = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 10 < killed_at < 30 and killed_at % 10, killed_at  # inside an epoch after the size change

    code, text = finish(senet("train", str(config), "--nproc", "2", "--out", str(part), "--resume", "auto", *common),
                        timeout=300)
    assert code == 0, text[-3000:]
    assert f"resumed from step {killed_at}" in text
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different
    momentum = lambda c: [s["momentum_buffer"] for s in c["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(momentum(a), momentum(b)))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 30
    assert all(torch.equal(a["ema"]["params"][k], b["ema"]["params"][k]) for k in a["ema"]["params"])
    rows = read_metrics(part / "metrics.jsonl")
    assert {"event": "resume", "step": killed_at} in rows
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps))  # rows after the checkpoint were dropped, not duplicated
    epochs = [r for r in rows if "crop_size" in r]
    assert [(r["epoch"], r["crop_size"]) for r in epochs] == [(0, 32), (1, 48), (2, 64)]
    assert all("val_top1_ema" in r for r in epochs)
    epoch = killed_at // 10  # the log counts epochs from 1
    assert f"epoch {epoch + 1}: training crops of {[32, 48, 64][epoch]} px" in text  # the resumed epoch's own size
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        board = EventAccumulator(str(part))
        board.Reload()
        assert [e.value for e in board.Scalars("train/crop_size")] == [32, 48, 64]
        assert [e.step for e in board.Scalars("val/top1_ema")] == [10, 20, 30]


def start_ranks(n: int, *args: str) -> list[subprocess.Popen]:
    """`senet train ARGS` as ranks 0..n-1 of one run, each its own process (as torchrun or Slurm starts them), so
    that each rank's exit status and output can be checked."""
    port = free_port()
    return [senet("train", *args, env={**os.environ, **DistInfo(rank=r, local_rank=r, world_size=n, local_world_size=n,
                                                                master_port=port).env()}) for r in range(n)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower() or "Traceback" in line]


@needs_loader
@pytest.mark.slow
def test_a_full_disk_is_one_line_every_rank_exits_alike_and_the_earlier_checkpoint_is_whole(
        data: Path, config: Path, tmp_path: Path, small_tmpfs) -> None:
    """The run folder on a tmpfs with room for one checkpoint and a half: the first lands, the second cannot."""
    model = create_model("se_resnext_tiny", num_classes=CLASSES)
    checkpoint = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights and momentum
    out = small_tmpfs(int(1.6 * checkpoint)) / "run"
    # 2 ranks x 8 = 16 per step, 160 samples per epoch: 10 steps per epoch; checkpoints at steps 2, 4 (no room), ...
    procs = start_ranks(2, str(config), "--out", str(out), *settings(
        data, tmp_path, "data.crop_size=32", "data.samples_per_epoch=160", "train.epochs=2", "train.batch_size=8",
        "train.checkpoint_every=2", "train.log_every=5"))
    (code0, text0), (code1, text1) = (finish(p, timeout=300) for p in procs)
    assert (code0, code1) == (1, 1), text0[-3000:] + text1[-3000:]
    folder = out / "checkpoints"
    errors = error_lines(text0 + text1)
    assert len(errors) == 1 and errors[0].startswith("senet train: error: "), errors
    for words in (str(folder), "no space left on device", "step 4", "needs about", "MB free", "untouched"):
        assert words in errors[0], (words, errors[0])
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000002.pt", "last.pt", "manifest.json"]  # no temp file
    assert load_checkpoint(folder / "last.pt")["step"] == 2  # verified against the manifest's sha256


@needs_loader
@pytest.mark.slow
def test_when_checkpoints_exist_but_none_verifies_every_rank_exits_2_with_one_line(data: Path, config: Path,
                                                                                  tmp_path: Path) -> None:
    """The checkpoints come from the engine's loop in this process (a small net: a second); what matters is
    that none verifies, which the resume finds before it would look at what they hold."""
    out = tmp_path / "run"
    with process_settings_kept():
        fit_in_memory(out, None, sets=["train.epochs=1", "train.checkpoint_every=4"])  # checkpoints at 4, 8 and 12
    folder = out / "checkpoints"
    truncate(folder / "ckpt-00000012.pt")
    flip_a_bit(folder / "ckpt-00000008.pt")
    truncate(folder / "manifest.json")  # torn too: the files are judged by their own CRC-32s
    flip_a_bit(folder / "ckpt-00000004.pt")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()}

    (code0, text0), (code1, text1) = (finish(p, timeout=200) for p in start_ranks(
        2, str(config), "--out", str(out), "--resume", "auto", *settings(data, tmp_path, "data.crop_size=32")))
    assert (code0, code1) == (2, 2), text0[-3000:] + text1[-3000:]
    errors = error_lines(text0 + text1)
    assert len(errors) == 1 and "no checkpoint verifies" in errors[0] and "--resume none" in errors[0], errors
    assert all(f"{checkpoint_name(step)} (" in errors[0] for step in (4, 8, 12))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()} == before  # nothing touched


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_config_errors_are_one_line_and_exit_2(data: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    code, err = run_cli(["train", str(bad)], capsys)
    assert code == 2 and len(err) == 1 and "train.epocs" in err[0] and "train.epochs" in err[0]

    code, err = run_cli(["train", str(config), "--set", f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and len(err) == 1 and "data.root" in err[0] and "nowhere" in err[0]

    code, err = run_cli(["train", str(config), "--set", f"data.root={data}", "--set", "model.num_classes=1000"], capsys)
    assert code == 2 and len(err) == 1 and "model.num_classes = 1000" in err[0] and f"{CLASSES} class folders" in err[0]

    code, err = run_cli(["train", str(config), "--set", "train.batch_size=0"], capsys)
    assert code == 2 and len(err) == 1 and "train.batch_size" in err[0]

    code, err = run_cli(["bench-train", str(config), "--set", f"data.root={data}", "--set", "model.arch=se_resnext9000"], capsys)
    assert code == 2 and len(err) == 1 and "se_resnext9000" in err[0]
    assert not (tmp_path / "runs").exists(), "a failed start must not leave a run folder"


def heartbeat(out: Path, rank: int) -> dict:
    """The rank's heartbeat file of the run in progress (training.health)."""
    (path,) = out.glob(f"health/*/rank-{rank}.json")
    return json.loads(path.read_text())


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {finish(proc, 10)[1][-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


def logged_step(out: Path) -> int:
    return max((r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r), default=0)


FAULT_RUN = ("data.crop_size=32", "train.epochs=50", "train.batch_size=8", "train.log_every=2", "train.dist_timeout_s=10")


@needs_loader
@pytest.mark.slow
def test_a_killed_rank_is_named_with_its_host_and_step_and_the_run_ends_at_once(data: Path, config: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "dead"
    proc = senet("train", str(config), "--nproc", "2", "--out", str(out), *settings(data, tmp_path, *FAULT_RUN))
    wait_for(lambda: logged_step(out) >= 4, proc, 120, "4 steps")
    victim = heartbeat(out, 1)
    os.kill(victim["pid"], signal.SIGKILL)
    killed, at_least = time.monotonic(), logged_step(out)
    code, text = finish(proc, timeout=60)  # also waits for every process holding its output: none may linger
    took = time.monotonic() - killed
    last = text.strip().splitlines()[-1]
    assert code == 1 and took < 15, (took, text[-2000:])
    assert last.startswith(f"senet train: error: rank 1 (node {socket.gethostname()}, pid {victim['pid']}; last step ")
    assert "stopped answering: dead (its connection closed)" in last
    assert int(last.split("last step ")[1].split(")")[0]) >= at_least
    assert "Traceback" not in text


@needs_loader
@pytest.mark.slow
def test_a_slow_rank_is_named_and_once_stopped_the_run_ends_naming_it_within_the_timeout(
        data: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "slow"
    env = {**os.environ, "SENET_TEST_SLOW_RANK": "1:0.4"}  # rank 1 sleeps 0.4 s after each step
    proc = senet("train", str(config), "--nproc", "2", "--out", str(out), *settings(data, tmp_path, *FAULT_RUN), env=env)
    named = lambda: [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "straggler"]  # noqa: E731
    wait_for(named, proc, 150, "a slow rank named in metrics.jsonl")
    (event,) = named()[:1]
    assert event["rank"] == 1 and event["node"] == socket.gethostname() and event["last_in"] * 2 >= event["window"]
    assert event["wait_s"] > 0.1  # a good part of the 0.4 s (the rest overlaps with the others' own input waits)

    victim = heartbeat(out, 1)
    os.kill(victim["pid"], signal.SIGSTOP)  # hung: alive, silent, holding its sockets open
    stopped = time.monotonic()
    code, text = finish(proc, timeout=90)
    took = time.monotonic() - stopped
    lines = text.strip().splitlines()
    assert code == 1 and took < 10 + 8, (took, text[-2000:])  # train.dist_timeout_s plus a few seconds
    assert any(line.startswith("WARNING senet.train: slow rank: rank 1 (node") for line in lines)
    assert lines[-1].startswith(f"senet train: error: rank 1 (node {socket.gethostname()}, pid {victim['pid']}; ")
    assert "stopped answering: hung or dead, no heartbeat for" in lines[-1]
    assert "Traceback" not in text
    assert not Path(f"/proc/{victim['pid']}").exists()  # the launcher ended the stopped rank too
