"""Checkpoints that survive what disks and file systems do, on the engine's loop in one process (resident tensors,
a small net: a run takes a second), with real files damaged for real and a real process killed mid-write.

Kept and verified: the newest `train.keep_checkpoints` files plus the best one, each recorded with its size and
sha256 in manifest.json; a truncated or bit-flipped newest checkpoint (with or without a torn manifest) is passed
over, named in one line, and the run continues from the previous one to the same bits as an uninterrupted run;
when none verifies, the resume stops. Written in the background: the same checkpoints as the synchronous writer,
and a kill during a write leaves the previous checkpoint whole. Timed checkpoints follow rank 0's clock.
Version 1 run folders resume. (Exit statuses, several ranks and a full disk: test_train_cli.py.)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (BATCH, N_TRAIN, ROOT, CheckpointRecorder, SignalAt, as_version_1, fit_in_memory,
                           flip_a_bit, process_settings_kept, tensors, truncate)
from training.checkpoint import ResumeError, load_checkpoint
from training.checkpoint_folder import newest_usable, verify_candidate
from training.checkpoint_manifest import Entry, Manifest, read_manifest, write_manifest
from training.control import RunControl
from training.durable import file_digest
from training.metrics import read_metrics

FINAL_STEP = 36


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def assert_same_parameters(a: Path, b: Path) -> None:
    x, y = parameters(a), parameters(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, different


def checkpoint_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("ckpt-", ".")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run, and one asked for a checkpoint and a stop at step 17, which keeps ckpt 17, 15 and 12
    (12 is best.pt's too). Shared: copy a run folder (`copy_run`) before damaging it."""
    tmp = tmp_path_factory.mktemp("runs")
    control = CheckpointRecorder()
    with process_settings_kept():
        fit_in_memory(tmp / "whole", None)
        part = fit_in_memory(tmp / "part", "auto", control, train=SignalAt(control, 17, *tensors(N_TRAIN, 123), BATCH))
    assert part["stopped"] and control.saved == [17]
    assert checkpoint_files(tmp / "part") == ["ckpt-00000012.pt", "ckpt-00000015.pt", "ckpt-00000017.pt"]
    return {"whole": tmp / "whole", "part": tmp / "part"}


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)  # last.pt and best.pt stay links
    return to


# ------------------------------------------------------------------------------------- kept and verified
def test_the_newest_n_and_the_best_are_kept_each_recorded_by_its_size_and_sha256(in_memory, runs) -> None:
    """The background writer (the default, `runs`) and the synchronous one write the same checkpoints."""
    fit, cfg, tmp = in_memory
    synchronous = fit(tmp / "synchronous", None, sets=["train.keep_checkpoints=2", "train.background_checkpoints=false"])
    assert synchronous["step"] == FINAL_STEP
    assert_same_parameters(runs["whole"], tmp / "synchronous")

    for run, kept in ((runs["whole"], [36, 35, 30]), (tmp / "synchronous", [36, 35])):
        folder = run / "checkpoints"
        manifest, problem = read_manifest(folder)
        assert problem is None and [e.step for e in manifest.checkpoints] == kept
        vals = [r for r in read_metrics(run / "metrics.jsonl") if "val_top1" in r]
        best = next(r for r in vals if r["val_top1"] == max(v["val_top1"] for v in vals))  # the first to reach it
        assert manifest.best.step == best["step"] and manifest.best.val_top1 == best["val_top1"]
        assert set(checkpoint_files(run)) == manifest.kept  # nothing else: no older file, no temporary file
        for e in (*manifest.checkpoints, manifest.best):
            digest = file_digest(folder / e.file)
            assert (digest.bytes, digest.sha256) == (e.bytes, e.sha256)
        assert os.readlink(folder / "last.pt") == "ckpt-00000036.pt"
        assert os.readlink(folder / "best.pt") == manifest.best.file
        written = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "checkpoint"]
        assert [r["step"] for r in written] == [5, 10, 12, 15, 20, 24, 25, 30, 35, 36]
        assert all(r["write_s"] > 0 and r["stall_s"] >= 0 and r["bytes"] > 0 for r in written)


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "bit-flipped, manifest torn"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_continues_exactly_from_the_previous_one(
        in_memory, runs, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    fit, cfg, tmp = in_memory
    folder = copy_run(runs["part"], tmp / "part") / "checkpoints"
    (truncate if damage == "truncated" else flip_a_bit)(folder / "ckpt-00000017.pt")
    if "torn" in damage:
        truncate(folder / "manifest.json")

    with caplog.at_level(logging.WARNING, logger="senet"):
        rest = fit(tmp / "part", "auto")
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "continuing" in r.getMessage()]
    assert len(notes) == 1, notes
    why = {"truncated": "truncated", "bit-flipped": "sha256 differs", "bit-flipped, manifest torn": "CRC-32"}[damage]
    assert "ckpt-00000017.pt (" in notes[0] and why in notes[0] and "continuing from step 15" in notes[0]
    assert {"event": "resume", "step": 15} in read_metrics(tmp / "part" / "metrics.jsonl")
    assert rest["step"] == FINAL_STEP
    assert_same_parameters(tmp / "part", runs["whole"])
    manifest, problem = read_manifest(folder)  # rewritten whole by the continued run
    assert problem is None and [e.step for e in manifest.checkpoints] == [36, 35, 30]


def test_when_no_checkpoint_verifies_the_resume_stops_naming_each_file_and_touches_nothing(in_memory, runs) -> None:
    fit, cfg, tmp = in_memory
    folder = copy_run(runs["part"], tmp / "run") / "checkpoints"
    truncate(folder / "ckpt-00000017.pt")
    flip_a_bit(folder / "ckpt-00000015.pt")
    (folder / "ckpt-00000012.pt").unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()}

    with pytest.raises(ResumeError) as e:
        fit(tmp / "run", "auto")
    assert "no checkpoint verifies" in str(e.value) and "--resume none" in str(e.value) and "\n" not in str(e.value)
    for name, why in (("ckpt-00000017.pt", "truncated"), ("ckpt-00000015.pt", "sha256"), ("ckpt-00000012.pt", "No such")):
        assert f"{name} ({why}" in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()} == before
    with pytest.raises(ResumeError, match="no checkpoint verifies"):  # what `senet submit --resume` checks
        newest_usable(folder, verify_candidate)
    with pytest.raises(ResumeError, match=r"--resume .*ckpt-00000015.pt: sha256 differs"):  # one named by hand
        fit(tmp / "run", str(folder / "ckpt-00000015.pt"))


# ---------------------------------------------------------------------------------------- in the background
def test_timed_checkpoints_follow_rank_0s_clock_at_the_agreed_steps(in_memory) -> None:
    """Every agreement (every 4 steps here) finds a timed checkpoint due; epoch ends have their own."""
    fit, cfg, tmp = in_memory
    fit(tmp / "timed", None, RunControl(check_every=4),
        sets=["train.checkpoint_every=1000", "train.checkpoint_every_min=0"])
    written = [r["step"] for r in read_metrics(tmp / "timed" / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert written == [4, 8, 12, 16, 20, 24, 28, 32, 36]  # by steps alone: 12, 24, 36


KILLED_RUN = """
import sys
from pathlib import Path
from tests.helpers import fit_in_memory
fit_in_memory(Path(sys.argv[1]), None, sets=sys.argv[2:], ballast_mb={ballast})
"""
BALLAST_MB = 64  # a checkpoint that takes long enough to write (and fsync) to be caught in the act
EPOCH_ENDS_ONLY = ["train.checkpoint_every=1000"]  # checkpoints at steps 12, 24 and 36


def test_a_kill_while_the_writer_writes_leaves_the_previous_checkpoint_whole_and_the_resume_exact(in_memory) -> None:
    fit, cfg, tmp = in_memory
    fit(tmp / "whole", None, sets=EPOCH_ENDS_ONLY, ballast_mb=BALLAST_MB)
    part = tmp / "part"
    folder = part / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(ballast=BALLAST_MB), str(part), *EPOCH_ENDS_ONLY],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    writing = []
    deadline = time.monotonic() + 120
    while not writing and proc.poll() is None and time.monotonic() < deadline:
        writing = [n for n in os.listdir(folder) if n.startswith(".ckpt-00000024.pt.tmp")] if folder.is_dir() else []
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert writing, "the run ended before the second checkpoint was caught being written"
    assert (folder / writing[0]).exists()  # killed mid-write: its temporary file is all there is of it
    assert os.readlink(folder / "last.pt") == "ckpt-00000012.pt" and load_checkpoint(folder / "last.pt")["step"] == 12

    rest = fit(part, "auto", sets=EPOCH_ENDS_ONLY, ballast_mb=BALLAST_MB)
    assert rest["step"] == FINAL_STEP and {"event": "resume", "step": 12} in read_metrics(part / "metrics.jsonl")
    assert_same_parameters(part, tmp / "whole")
    assert checkpoint_files(part) == ["ckpt-00000012.pt", "ckpt-00000024.pt", "ckpt-00000036.pt"]  # no leftover


# ---------------------------------------------------------------------------------------------- version 1
def test_a_version_1_run_folder_resumes_exactly_and_keeps_its_checkpoint_as_a_fallback(in_memory, runs) -> None:
    fit, cfg, tmp = in_memory
    folder = copy_run(runs["part"], tmp / "part") / "checkpoints"
    state = load_checkpoint(folder / "ckpt-00000017.pt")
    for p in folder.iterdir():
        p.unlink()
    torch.save(as_version_1(state), folder / "last.pt")  # the old layout: one plain last.pt, no manifest

    rest = fit(tmp / "part", "auto")
    assert rest["step"] == FINAL_STEP and {"event": "resume", "step": 17} in read_metrics(tmp / "part" / "metrics.jsonl")
    assert_same_parameters(tmp / "part", runs["whole"])
    manifest, _ = read_manifest(folder)
    assert [e.step for e in manifest.checkpoints] == [36, 35, 30]
    assert load_checkpoint(folder / "last.pt")["format_version"] == 2


def test_an_altered_manifest_is_not_trusted(tmp_path: Path) -> None:
    """A manifest whose bytes were altered (not only torn) is recognised by its own sha256 and not trusted."""
    write_manifest(tmp_path, Manifest((Entry("ckpt-00000005.pt", 5, 0, 10, "ab" * 32, "t"),)))
    manifest, problem = read_manifest(tmp_path)
    assert problem is None and manifest.entry("ckpt-00000005.pt").bytes == 10
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text.replace('"bytes": 10', '"bytes": 11'))
    manifest, problem = read_manifest(tmp_path)
    assert manifest is None and "fails its own sha256" in problem
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 9}))
    assert "version 9" in read_manifest(tmp_path)[1]
