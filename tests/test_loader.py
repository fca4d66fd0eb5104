"""TrainLoader / EvalLoader: sharding, exact resume, world-size independence, bad files, processes.

Real DALI on the CPU over the session's small synthetic tree (real JPEGs, planted bad files).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline.datasets import index_train, index_val
from pipeline.devkit import load_devkit
from pipeline.processes import child_pids, start_method
from tests.helpers import (LOADER_CROP as CROP, bogus_huffman_table, eval_loader, planted, train_loader,
                           tree_with_a_broken_file)


def test_batches_shape_length_and_labels(clean) -> None:
    index, bad = clean
    with train_loader(index, exclude=bad) as loader:
        batches = list(loader)
    assert len(batches) == len(loader) == (len(index) - len(bad)) // 6
    images, labels = batches[0]
    assert images.shape == (6, 3, CROP, CROP) and images.dtype == torch.float16 and labels.dtype == torch.int64
    assert torch.isfinite(images.float()).all() and 0.3 < images.float().std() < 3


def test_mid_epoch_resume_gives_the_same_batches(clean) -> None:
    index, bad = clean
    with train_loader(index, exclude=bad, py_workers=1) as a:
        a.set_epoch(2)
        it = iter(a)
        for _ in range(2):
            next(it)
        state = json.loads(json.dumps(a.state_dict()))  # plain values
        expected = [next(it) for _ in range(3)]
    assert state["epoch"] == 2 and state["global_position"] == 12
    with train_loader(index, exclude=bad) as b:
        b.load_state_dict(state)
        b.set_epoch(2)  # the engine sets the epoch again: the resume point survives
        got = [batch for batch, _ in zip(b, range(3))]
    for (x, y), (x2, y2) in zip(expected, got):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_same_draws_for_the_same_global_positions_under_another_world_size(clean) -> None:
    index, bad = clean
    with train_loader(index, exclude=bad, batch_size=8, samples_per_epoch=48) as one:
        x1, y1 = next(iter(one))  # global positions 0..7
    parts = []
    for rank in range(2):  # rank r holds global positions r, r + 2, ...
        with train_loader(index, exclude=bad, batch_size=4, samples_per_epoch=48, rank=rank, world_size=2) as r:
            parts.append(next(iter(r)))
    x2 = torch.stack([parts[p % 2][0][p // 2] for p in range(8)])
    y2 = torch.stack([parts[p % 2][1][p // 2] for p in range(8)])
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_process_hosting_several_ranks_gets_each_ranks_own_batches_and_resumes_from_any_shape(clean) -> None:
    """Virtual ranks 0-3 read by four loaders, or by two hosting two each: the same batches, bit for bit, in
    rank order within a step; a position saved by the four continues in a hosting loader."""
    index, bad = clean
    shape = dict(exclude=bad, batch_size=3, samples_per_epoch=48)  # 4 steps of 3 per rank per epoch
    alone = []
    for rank in range(4):
        with train_loader(index, rank=rank, world_size=4, **shape) as loader:
            alone.append(list(loader))
    for first in (0, 2):
        with train_loader(index, rank=first, world_size=4, hosted=2, **shape) as hosting:
            assert len(hosting) == 8 and hosting.hosted == 2
            got = list(hosting)
        expected = [alone[first + shard][step] for step in range(4) for shard in range(2)]
        for (x, y), (x2, y2) in zip(expected, got, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)

    with train_loader(index, rank=0, world_size=4, **shape) as one:
        it = iter(one)
        next(it)
        state = one.state_dict()  # one step done by each of the 4 ranks: global position 12
    assert state["global_position"] == 12
    with train_loader(index, rank=0, world_size=2, **shape) as hosting:  # built for another shape, then re-sharded
        hosting.shard(0, 4, hosted=4)
        hosting.load_state_dict(state)
        got = [batch for batch, _ in zip(hosting, range(8))]  # steps 2 and 3 of all four ranks
    expected = [alone[shard][step] for step in (1, 2) for shard in range(4)]
    for (x, y), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_prefetch_depth_and_workers_do_not_change_the_batches(clean) -> None:
    index, bad = clean
    runs = []
    for prefetch, py_workers in ((1, 0), (3, 2)):
        with train_loader(index, exclude=bad, prefetch=prefetch, py_workers=py_workers) as loader:
            runs.append([batch for batch, _ in zip(loader, range(3))])
    for (x, y), (x2, y2) in zip(*runs):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_epochs_differ_and_repeat(clean) -> None:
    index, bad = clean
    with train_loader(index, exclude=bad) as loader:
        first = next(iter(loader))[0]
        loader.set_epoch(1)
        second = next(iter(loader))[0]
        loader.set_epoch(0)
        again = next(iter(loader))[0]
    assert torch.equal(first, again) and not torch.equal(first, second)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_every_image_once(small_tree: Path, world_size: int) -> None:
    train = index_train(small_tree)
    val = index_val(small_tree, load_devkit(small_tree / "ILSVRC2012_devkit_t12"), train.classes)
    seen, labels = [], []
    for rank in range(world_size):
        with eval_loader(val, rank=rank, world_size=world_size, py_workers=world_size - 1,
                         prefetch=world_size + 1) as ev:  # the source runs up to 4 batches ahead of 2 or 3
            batches = list(ev)
            assert len(batches) == len(ev)
            again = [p for _, _, pos in ev for p in pos.tolist()]  # a second pass after the reset
            mine = [p for _, _, pos in batches for p in pos.tolist()]
            assert mine == list(range(mine[0], mine[0] + len(mine))) if mine else True  # contiguous, in order
            assert again == mine
            seen += mine
            labels += [y for _, lab, _ in batches for y in lab.tolist()]
    assert sorted(seen) == seen == list(range(len(val)))
    assert labels == val.labels.tolist()


def test_corrupt_file_is_named_replaced_and_counted(small_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = index_train(small_tree)
    truncated = planted(small_tree, "truncated")
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with train_loader(index, sampling="shuffle", batch_size=1, py_workers=1) as loader:  # every file once
            labels = [y for _, y in loader]
            stats = dict(loader.stats)
        with train_loader(index, sampling="shuffle", batch_size=1) as again:
            assert [y for _, y in again] == labels  # the replacement is deterministic
    assert stats["replaced_files"] == 2 and stats["replaced_samples"] == 2  # truncated + zero bytes
    assert set(stats["bad_files"]) == planted(small_tree, "truncated", "zero_bytes")
    assert any(f in caplog.text for f in truncated)


def test_file_that_kills_the_pipeline_is_found_and_replaced(small_tree: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    index, victim = tree_with_a_broken_file(small_tree, tmp_path / "tree", bogus_huffman_table)
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with train_loader(index, sampling="shuffle", batch_size=2) as loader:
            n = sum(len(y) for _, y in loader)
            stats = dict(loader.stats)
    assert n == len(index) // 2 * 2
    assert stats["rebuilds"] == 1 and stats["bad_files"] == [victim] and stats["replaced_samples"] == 1
    assert victim in caplog.text


def test_excluded_files_never_appear(small_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = index_train(small_tree)
    bad = planted(small_tree, "truncated", "zero_bytes")
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with train_loader(index, sampling="shuffle", batch_size=1, exclude=bad) as loader:
            assert not set(loader.index.files) & bad
            assert len(list(loader)) == len(index) - len(bad)
            assert loader.stats["replaced_samples"] == 0
    assert not caplog.text


def _ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores signal `signum` (its SigIgn mask in /proc)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def test_no_worker_processes_after_close_or_exception(clean) -> None:
    index, bad = clean
    before = child_pids()
    loader = train_loader(index, exclude=bad, py_workers=2)
    workers = child_pids() - before
    assert len(workers) == 2
    next(iter(loader))
    loader.close()
    assert not _alive(workers)
    before = child_pids()
    with pytest.raises(ZeroDivisionError):
        with train_loader(index, exclude=bad, py_workers=2) as loader:
            workers = child_pids() - before
            next(iter(loader))
            1 / 0
    assert workers and not _alive(workers)


def test_workers_survive_sigterm_inside_slurm(clean, monkeypatch: pytest.MonkeyPatch) -> None:
    index, bad = clean
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    before = child_pids()
    with train_loader(index, exclude=bad, py_workers=1) as loader:
        workers = child_pids() - before
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        assert _alive(workers) == workers
        assert len(list(loader)) == len(loader)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # only the workers ignore it
    assert not _alive(workers)


def test_resume_at_the_end_of_an_epoch_continues_with_the_next(clean) -> None:
    index, bad = clean
    with train_loader(index, exclude=bad, py_workers=1) as a:
        list(a)  # epoch 0, to the end
        state = a.state_dict()
        a.set_epoch(1)
        expected = list(a)
    with train_loader(index, exclude=bad, py_workers=1) as b:
        b.load_state_dict(state)
        assert list(b) == []  # nothing of epoch 0 is left
        b.set_epoch(1)
        got = list(b)
    assert len(got) == len(expected) == len(b)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(expected, got))


def test_eval_survives_bad_files(small_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = index_train(small_tree)  # holds a truncated and an empty file
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with eval_loader(index, batch_size=16, py_workers=1) as ev:
            positions = [p for _, _, pos in ev for p in pos.tolist()]
            bad = sorted(ev.stats["bad_files"])
    assert positions == list(range(len(index)))
    assert bad == sorted(planted(small_tree, "truncated", "zero_bytes"))
    assert all(f in caplog.text for f in bad)


def test_workers_are_spawned_once_dali_reports_the_cuda_driver_initialised(clean, monkeypatch: pytest.MonkeyPatch) -> None:
    """DALI refuses to fork after the driver is up (its own check): the loader asks the same check and
    spawns its workers instead; the batches are the same."""
    import multiprocessing

    from nvidia.dali import backend

    index, bad = clean
    assert start_method() == "fork"  # nothing here has initialised the driver
    with train_loader(index, exclude=bad, py_workers=1) as forked:
        expected = next(iter(forked))
    monkeypatch.setattr(backend, "IsDriverInitialized", lambda: True)
    assert start_method() == "spawn"
    seen = []
    real_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: seen.append(method) or real_context(method))
    with train_loader(index, exclude=bad, py_workers=1) as spawned:
        got = next(iter(spawned))
    assert "spawn" in seen
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


_RUNNER = """
import signal
import sys
import time
# Ctrl-C as a terminal's foreground command gets it: a shell starts a background command (`make test &` in a
# script) with SIGINT ignored, and Python keeps that, so the runner would never see the interrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline.augment import AugmentSpec
from pipeline.datasets import index_train
from pipeline.input_spec import CropSchedule, Runtime, TrainInput
from pipeline.loader import TrainLoader
from pipeline.processes import child_pids
spec = TrainInput(batch_size=4, crop=CropSchedule(32), aug=AugmentSpec(), seed=0, sampling="shuffle",
                  runtime=Runtime(threads=1, py_workers=2, prefetch=2))
loader = TrainLoader(index_train(sys.argv[1]), spec)
with loader:
    print(" ".join(map(str, sorted(child_pids()))), flush=True)
    if sys.argv[2:] == ["idle"]:  # a rank whose loader never ran a batch (a val loader before the first eval)
        time.sleep(600)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        epoch += 1
"""


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill", "sigkill before any batch"])
def test_no_orphans_after_ctrl_c_or_a_killed_parent(small_tree: Path, how: str) -> None:
    import subprocess
    import sys

    idle = ["idle"] if how == "sigkill before any batch" else []
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, str(small_tree), *idle], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        workers = {int(p) for p in proc.stdout.readline().split()}
        assert len(workers) == 2
        time.sleep(1.0)  # mid-epoch, workers busy (or idle, never having had a batch)
        # Workers leave Ctrl-C to their owner: one interrupted inside DALI's shared queue can die between a lock's
        # acquire and release ("lock is not owned": about 1 interrupted run in 40 under load), and the owner's
        # close could then wait for that lock.
        assert all(_ignores(pid, signal.SIGINT) for pid in workers)
        if how == "ctrl-c":  # the terminal signals the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while _alive(workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(workers)
    finally:
        if proc.poll() is None:
            proc.kill()
