"""Specification of the training engine's parts, in one process (fast; the multi-process runs are in
test_train_cli.py and test_virtual_ranks.py): LR schedule of the recipe, optimizer choice, checkpoints, metrics
log, DistInfo, non-finite loss detection, evaluation counts, exact resume through a RunControl stop, and
virtual ranks hosted by one process."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.loader import ResidentLoader
from tests.helpers import BATCH, IN_MEMORY, N_TRAIN, CheckpointRecorder, SignalAt, small_model, tensors
from training import engine
from training.build import Data, build
from training.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, load_checkpoint, unwrap
from training.config import ConfigError, OptimConfig, load_config
from training.metrics import MetricsLog, plot_curves, read_metrics
from training.optim import LRSchedule, build_optimizer, param_groups, real_apex_fused_sgd
from training.placement import place_run
from training.precision import resolve_precision
from training.ranks import DistInfo
from training.accumulate import VirtualGradients
from training.virtual import VirtualRanks


# --- LR schedule: the paper's recipe -----------------------------------------------------------------

def test_lr_is_scaled_linearly_from_the_reference_batch() -> None:
    recipe = OptimConfig(lr=0.6, reference_batch=1024)
    assert LRSchedule(recipe, 1024, 100, 100).lr(0) == pytest.approx(0.6)
    assert LRSchedule(recipe, 2048, 100, 100).lr(0) == pytest.approx(1.2)
    assert LRSchedule(recipe, 256, 100, 100).lr(0) == pytest.approx(0.15)


def test_step_schedule_divides_by_ten_every_30_epochs() -> None:
    s = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024), global_batch=1024, steps_per_epoch=1251, epochs=100)
    epoch = lambda e: e * 1251  # noqa: E731  first step of epoch e
    assert s.lr(0) == pytest.approx(0.6)
    assert s.lr(epoch(30) - 1) == pytest.approx(0.6)
    assert s.lr(epoch(30)) == pytest.approx(0.06)
    assert s.lr(epoch(60)) == pytest.approx(0.006)
    assert s.lr(epoch(90)) == pytest.approx(0.0006)
    assert s.lr(epoch(100) - 1) == pytest.approx(0.0006)


def test_warmup_rises_linearly_to_the_peak_then_the_steps_apply() -> None:
    s = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024, warmup_epochs=5), 2048, 100, 100)
    assert s.warmup_steps == 500
    assert s.lr(0) == pytest.approx(1.2 / 500)  # moves from the first step
    assert s.lr(249) == pytest.approx(1.2 * 250 / 500)
    assert s.lr(499) == pytest.approx(1.2)
    assert s.lr(500) == pytest.approx(1.2)
    assert s.lr(3000) == pytest.approx(0.12)
    assert all(s.lr(i) < s.lr(i + 1) for i in range(499))


def test_cosine_schedule_after_warmup() -> None:
    s = LRSchedule(OptimConfig(lr=0.1, reference_batch=256, schedule="cosine", warmup_epochs=1), 256, 10, 11)
    assert s.lr(9) == pytest.approx(0.1)
    assert s.lr(10 + 50) == pytest.approx(0.05)  # half-way through the 100 decay steps
    assert s.lr(109) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_schedule_sets_the_optimizer_lr_per_step_and_resumes_from_its_count() -> None:
    model = nn.Linear(2, 2)
    opt, _ = build_optimizer(model, OptimConfig(), "cpu")
    s = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024, step_epochs=1), 1024, 2, 3)
    lrs = []
    for _ in range(5):
        lrs.append(s.apply(opt))
        assert opt.param_groups[0]["lr"] == lrs[-1]
        s.step()
    assert lrs == pytest.approx([0.6, 0.6, 0.06, 0.06, 0.006])
    t = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024, step_epochs=1), 1024, 2, 3)
    t.load_state_dict(s.state_dict())
    assert t.apply(opt) == pytest.approx(0.006)


# --- optimizer -------------------------------------------------------------------------------------

def test_no_decay_group_holds_bn_and_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert len(param_groups(model, 1e-4, decay_bn_and_bias=True)) == 1
    decay, no_decay = param_groups(model, 1e-4, decay_bn_and_bias=False)
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 1e-4
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # conv bias, BN gamma+beta, fc bias


def test_optimizer_choice_on_cpu() -> None:
    model = nn.Linear(2, 2)
    opt, kind = build_optimizer(model, OptimConfig(momentum=0.9, nesterov=True), "cpu")
    assert kind == "torch foreach" and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="optim.fused = 'torch'"):
        build_optimizer(model, OptimConfig(fused="torch"), "cpu")
    with pytest.raises(ConfigError, match="optim.fused = 'apex'"):
        build_optimizer(model, OptimConfig(fused="apex"), "gpu")


def test_the_unrelated_pypi_apex_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("apex")
    fake.__file__ = "/site-packages/apex/__init__.py"
    monkeypatch.setitem(sys.modules, "apex", fake)
    monkeypatch.setattr("importlib.metadata.metadata", lambda name: {"Summary": "Pyramid toolkit to add Velruse, Flash Messages"})
    cls, why = real_apex_fused_sgd()
    assert cls is None and "unrelated PyPI package" in why and "Pyramid" in why
    with pytest.raises(ConfigError, match="unrelated PyPI"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(fused="apex"), "gpu")


def test_precision_defaults() -> None:
    assert resolve_precision("auto", "cpu").name == "fp32" and not resolve_precision("auto", "cpu").enabled
    gpu = resolve_precision("auto", "gpu")
    assert gpu.name == "bf16" and gpu.enabled and not gpu.scaled and gpu.device_type == "cuda"
    assert resolve_precision("fp16", "gpu").scaled


def test_an_nhwc_batch_reaches_a_channels_last_model_without_a_copy() -> None:
    """Why data.layout auto is NHWC for a channels_last model: the batch is handed over as a view of its own
    memory, already in the model's format; an NCHW batch is not, and the first convolution would copy it."""
    batch, labels = torch.randn(2, 8, 8, 3, dtype=torch.bfloat16), torch.tensor([1, 0])
    bf16 = resolve_precision("bf16", "cpu")
    images, _ = engine.prepare_batch(batch, labels, bf16, "NHWC")
    assert images.shape == (2, 3, 8, 8) and images.data_ptr() == batch.data_ptr()
    assert images.is_contiguous(memory_format=torch.channels_last)
    nchw, _ = engine.prepare_batch(batch.permute(0, 3, 1, 2).contiguous(), labels, bf16, "NCHW")
    assert not nchw.is_contiguous(memory_format=torch.channels_last)


# --- checkpoints, metrics, DistInfo ----------------------------------------------------------------

def test_checkpoint_is_atomic_and_weights_only_loadable(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    compiled = nn.Module()  # what torch.compile returns holds the model as _orig_mod
    compiled._orig_mod = model
    assert unwrap(compiled) is model and not any(k.startswith(("module.", "_orig_mod.")) for k in unwrap(compiled).state_dict())
    state = {"format_version": FORMAT_VERSION, "kind": "training", "model": model.state_dict(), "optimizer": {}, "scaler": {},
             "scheduler": {"step_count": 3}, "epoch": 1, "step": 3, "loader": {"epoch": 1, "position": 12},
             "classes": ["n1", "n2"], "arch": "x", "num_classes": 2, "config": {"train": {"seed": 0}}}
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["0.weight"], model[0].weight)
    assert load_checkpoint(path)["classes"] == ["n1", "n2"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unusable checkpoint: not a whole checkpoint file"):
        load_checkpoint(path)


def test_curves_are_skipped_with_one_notice_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A GPU node's bare interpreter may lack matplotlib: the run ends normally, without curves.png."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="senet.train"):
        assert plot_curves([{"step": 1, "loss": 1.0, "lr": 0.1}], tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists()
    assert [r.getMessage() for r in caplog.records] == [
        "no curves.png: matplotlib is not installed (pip install matplotlib); metrics.jsonl holds the same rows"]


def test_metrics_truncation_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in (5, 10, 15, 20):
        log.write({"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 0.1})
    log.write({"step": 20, "epoch": 1, "val_top1": 0.5, "val_top5": 0.9})
    log.write({"step": 25, "loss": float("nan")})
    with open(log.path, "a") as f:
        f.write('{"step": 30, "lo')  # the row in flight when the process was killed
    assert log.truncate_after(15) == 4
    log.write({"event": "resume", "step": 15})
    rows = read_metrics(log.path)
    assert [r["step"] for r in rows] == [5, 10, 15, 15] and rows[-1] == {"event": "resume", "step": 15}
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_dist_info_from_torchrun_and_slurm_variables() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "1234"}
    d = DistInfo.from_env(torchrun)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port) == (3, 8, 1, 2, "n1", 1234)
    assert not d.is_main and d.distributed and DistInfo.from_env(d.env()) == d
    slurm = DistInfo.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size) == (5, 16, 5, 8)
    assert DistInfo.from_env({}) == DistInfo()
    with pytest.raises(ValueError, match="RANK='x'"):
        DistInfo.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside"):
        DistInfo(rank=2, world_size=2)


# --- steps: non-finite loss, evaluation -------------------------------------------------------------

def test_non_finite_loss_is_caught_at_the_next_check_naming_its_step() -> None:
    meter = engine.StepMeter(torch.device("cpu"), images_per_step=8)
    for loss in (1.0, 0.9, float("nan"), 0.8, float("inf")):
        meter.add(torch.tensor(loss))
    with pytest.raises(engine.NonFiniteLoss, match="at step 13"):  # steps 11..15 here: the first NaN is 13
        meter.check_finite(step=15, group=None)


def test_meter_row() -> None:
    meter = engine.StepMeter(torch.device("cpu"), images_per_step=8)
    meter.add(torch.tensor(1.0))
    meter.add(torch.tensor(3.0))
    meter.waited(0.0)
    row = meter.flush(step=2, group=None)
    assert row["loss"] == 2.0 and row["images_per_s"] > 0 and 0 <= row["data_wait_fraction"] <= 1


class Scores(nn.Module):
    """A 'model' whose logits are the inputs: the test chooses the ranking."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_evaluate_counts_top1_and_topk_over_all_images() -> None:
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],   # label 0: top-1
                           [1., 9, 8, 3, 4, 5, 6],   # label 2: second: in the top k only
                           [9., 8, 7, 6, 5, 1, 0],   # label 6: last, missed
                           [0., 1, 2, 3, 4, 5, 9]])  # label 6: top-1
    labels = torch.tensor([0, 2, 6, 6])
    batches = [(logits[:3], labels[:3], torch.arange(3)), (logits[3:], labels[3:], torch.arange(3, 4))]
    m = engine.evaluate(Scores(), batches, resolve_precision("fp32", "cpu"), 7, torch.device("cpu"))
    assert m == {"val_top1": 0.5, "val_top5": 0.75, "val_images": 4}
    m = engine.evaluate(Scores(), batches, resolve_precision("fp32", "cpu"), 3, torch.device("cpu"))
    assert m["val_top5"] == 0.75  # k = min(5, classes) = 3


# --- the whole loop in one process, built from parts: resident tensors and a small net -----------------
# (tests/helpers.py: tensors, SignalAt, small_model, fit_in_memory; the `in_memory` fixture in conftest.py)

def test_stop_on_request_then_resume_is_exact_and_metrics_read_as_one_run(in_memory) -> None:
    fit, cfg, tmp = in_memory
    whole = fit(tmp / "whole", resume=None)
    assert whole["step"] == 36 and not whole["stopped"] and 0 <= whole["val_top1"] <= 1

    control = CheckpointRecorder()
    part = fit(tmp / "part", "auto", control, train=SignalAt(control, 17, *tensors(N_TRAIN, 123), BATCH))
    assert part["stopped"] and part["step"] == 17 and control.saved == [17]
    rest = fit(tmp / "part", resume="auto")
    assert rest["step"] == 36

    a = torch.load(tmp / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp / "whole" / "checkpoints" / "best.pt").is_file() and (tmp / "whole" / "curves.png").is_file()

    rows_whole, rows_part = read_metrics(tmp / "whole" / "metrics.jsonl"), read_metrics(tmp / "part" / "metrics.jsonl")
    assert {"event": "resume", "step": 17} in rows_part
    strip = lambda rows: [(r["step"], r.get("val_top1")) for r in rows if "event" not in r]  # noqa: E731
    assert strip(rows_part) == strip(rows_whole)  # the same rows, each logged once
    # Same losses, except the row whose window spans the resume (it averages only the steps after it).
    losses = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r and not 17 < r["step"] <= 20}  # noqa: E731
    assert losses(rows_part) == losses(rows_whole)
    assert (tmp / "part" / "config.yaml").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(in_memory) -> None:
    fit, cfg, tmp = in_memory
    poisoned = ResidentLoader(*tensors(N_TRAIN, 123, poisoned_batch=6), BATCH)  # the 7th step's batch
    with pytest.raises(engine.NonFiniteLoss, match="at step 7"):
        fit(tmp / "nan", resume=None, train=poisoned)
    ckpt = torch.load(tmp / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp / "nan" / "metrics.jsonl") if "loss" in r)


def test_a_well_fed_run_raises_no_stall_alarm_and_its_summary_gives_the_wait(tmp_path: Path, caplog) -> None:
    """Batches already on the device (a ResidentLoader) never hold a step up: no warning in any window.

    Windows of 12 steps of a model with some milliseconds of work each, as a real run's are long: in
    a window of a few sub-millisecond steps, one scheduler hiccup inside `next` is a tenth of it."""
    cfg = load_config(None, ["model.num_classes=3", "train.device=cpu", "train.epochs=3", f"train.batch_size={BATCH}",
                             "train.log_every=12", "optim.lr=0.1", "optim.reference_batch=8"])
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (N_TRAIN,), generator=g)
    images = torch.randn(N_TRAIN, 3, 32, 32, generator=g) + labels[:, None, None, None].float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
    threads = torch.get_num_threads()
    r = build(cfg, place_run(cfg, DistInfo()), tmp_path, data=Data(("a", "b", "c")),
              loaders=(ResidentLoader(images, labels, BATCH), None), model=model)
    try:
        with caplog.at_level(logging.WARNING, logger="senet.train"):
            summary = engine.fit(r, resume=None)
    finally:
        r.close()
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert summary["step"] == 36 and not [rec for rec in caplog.records if "input stall" in rec.getMessage()]
    assert 0 <= summary["data_wait_fraction"] < cfg.train.data_wait_warn


class CrashAt(ResidentLoader):
    """Training batches that fail when batch `at` is taken (overall count): a crash mid-epoch."""

    def __init__(self, at: int, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.at, self.taken = at, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.taken += 1
            if self.taken == self.at:
                raise RuntimeError("crashed")
            yield batch


def test_curves_go_to_tensorboard_too_and_a_resume_reads_as_one_run(in_memory) -> None:
    """Event files in the run folder with the documented tags. A crash after step 16 was logged and a resume
    from the checkpoint at step 15: TensorBoard, like metrics.jsonl, shows every step once."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from training.metrics import TENSORBOARD_TAGS

    fit, cfg, tmp = in_memory
    with pytest.raises(RuntimeError, match="crashed"):
        fit(tmp / "run", resume=None, train=CrashAt(19, *tensors(N_TRAIN, 123), BATCH))
    assert max(r["step"] for r in read_metrics(tmp / "run" / "metrics.jsonl") if "loss" in r) == 16
    fit(tmp / "run", resume="auto")  # from the checkpoint at step 15
    board = event_accumulator.EventAccumulator(str(tmp / "run"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction", "val/top1",
            "val/top5", "checkpoint/write_s"} <= tags <= set(TENSORBOARD_TAGS.values())
    loss_steps = [e.step for e in board.Scalars("train/loss")]
    assert loss_steps == [4, 8, 12, 16, 20, 24, 28, 32, 36]  # step 16 logged twice, shown once
    rows = [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    assert [e.step for e in board.Scalars("val/top1")] == [12, 24, 36]


# --- weight EMA ----------------------------------------------------------------------------------------

class Snapshots(ResidentLoader):
    """Training batches that copy the model's weights (float64) before each batch is handed out and after the
    last: `weights[n]` are the weights after n optimizer steps."""

    def __init__(self, model: nn.Module, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.model, self.taken, self.weights = model, 0, {}

    def _record(self) -> None:
        self.weights[self.taken] = {n: p.detach().double().clone() for n, p in self.model.named_parameters()}

    def __iter__(self):
        for batch in super().__iter__():
            self._record()
            self.taken += 1
            yield batch
        self._record()


@pytest.mark.parametrize("every", [1, 3])
def test_the_weight_ema_is_the_average_computed_by_hand(in_memory, every: int) -> None:
    """ema_t = d * ema_(t-1) + (1 - d) * w_t, applied every k steps as d**k; no warm-up (ema_0 = w_0); fp32."""
    fit, cfg, tmp = in_memory
    decay, model = 0.8, small_model(cfg)
    train = Snapshots(model, *tensors(N_TRAIN, 123), BATCH)
    fit(tmp / "run", None, train=train, model=model, sets=(f"train.ema_decay={decay}", f"train.ema_every={every}"))
    steps = max(train.weights)
    ema = dict(train.weights[0])
    for t in range(1, steps + 1):
        if t % every == 0:
            kept = decay ** every
            ema = {name: kept * value + (1 - kept) * train.weights[t][name] for name, value in ema.items()}
    saved = torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)["ema"]
    assert steps == 36 and saved["updates"] == steps and (saved["decay"], saved["every"]) == (decay, every)
    assert saved["params"].keys() == ema.keys() and all(v.dtype == torch.float32 for v in saved["params"].values())
    for name, value in saved["params"].items():
        torch.testing.assert_close(value.double(), ema[name], rtol=1e-5, atol=1e-6)


def test_the_ema_resumes_exactly_never_touches_training_and_best_pt_names_the_winner(in_memory) -> None:
    fit, cfg, tmp = in_memory
    ema = ("train.ema_decay=0.7",)
    fit(tmp / "plain", None)
    whole = fit(tmp / "whole", None, sets=ema)
    control = CheckpointRecorder()
    part = fit(tmp / "part", "auto", control, train=SignalAt(control, 17, *tensors(N_TRAIN, 123), BATCH), sets=ema)
    assert part["stopped"] and part["step"] == 17
    fit(tmp / "part", "auto", sets=ema)

    def load(run: str, name: str = "last.pt") -> dict:
        return torch.load(tmp / run / "checkpoints" / name, weights_only=True)

    a, b, plain = load("whole"), load("part"), load("plain")
    assert all(torch.equal(a["ema"]["params"][k], b["ema"]["params"][k]) for k in a["ema"]["params"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 36
    # validating the EMA swaps it in and out: the raw weights train exactly as without an EMA
    assert all(torch.equal(a["model"][k], plain["model"][k]) for k in a["model"])
    rows = [r for r in read_metrics(tmp / "whole" / "metrics.jsonl") if "val_top1" in r]
    assert len(rows) == 3 and all({"val_top1_ema", "val_top5_ema"} <= r.keys() for r in rows)
    winner = max(rows, key=lambda r: max(r["val_top1"], r["val_top1_ema"]))  # the first epoch reaching the best
    best = load("whole", "best.pt")
    assert best["step"] == winner["step"] and best["best_top1"] == max(winner["val_top1"], winner["val_top1_ema"])
    assert best["best_weights"] == whole["best_weights"] == ("ema" if winner["val_top1_ema"] > winner["val_top1"]
                                                             else "raw")


@pytest.mark.parametrize("which", ["raw", "ema", "best"])
def test_init_from_starts_from_the_weights_asked_for(in_memory, which: str) -> None:
    """train.init_weights: raw, the EMA (its parameters with the model's BN buffers), or those best.pt names; a
    new EMA starts at the weights the run starts from."""
    fit, cfg, tmp = in_memory
    fit(tmp / "source", None, sets=("train.ema_decay=0.7",))
    source = tmp / "source" / "checkpoints" / "best.pt"
    saved = torch.load(source, weights_only=True)
    kind = saved["best_weights"] if which == "best" else which
    expected = dict(saved["model"])
    if kind == "ema":
        expected.update(saved["ema"]["params"])
    run_cfg = replace(cfg, train=replace(cfg.train, init_from=str(source), init_weights=which, ema_decay=0.5))
    r = build(run_cfg, place_run(run_cfg, DistInfo()), tmp / "fresh", data=Data(("a", "b", "c")),
              loaders=(ResidentLoader(*tensors(N_TRAIN, 123), BATCH), None), model=small_model(run_cfg))
    try:
        engine.restore(r, None)
        got, started = r.model.state_dict(), r.ema.state_dict()["params"]
    finally:
        r.close()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(started[k], expected[k]) for k in started)


# --- virtual ranks: one process hosting several (training.virtual, training.accumulate) ----------------------

def test_a_process_hosting_two_virtual_ranks_takes_their_mean_gradient_and_the_first_ones_bn_statistics() -> None:
    cfg = load_config(None, IN_MEMORY)
    model = small_model(cfg).train()
    images, labels = tensors(2 * BATCH, 5)
    halves = (slice(0, BATCH), slice(BATCH, 2 * BATCH))
    alone = []
    for j, rows in enumerate(halves):  # each virtual rank on its own, as a process of its own would compute it
        twin = copy.deepcopy(model)
        torch.manual_seed(j)  # dropout, as the engine seeds each virtual rank
        F.cross_entropy(twin(images[rows]), labels[rows]).backward()
        alone.append(([p.grad for p in twin.parameters()], [b.clone() for b in twin.buffers()]))

    hosting = VirtualGradients(model, None, VirtualRanks(total=2, world_size=1, rank=0, batch_size=BATCH), exact=True)
    for j, rows in enumerate(halves):
        torch.manual_seed(j)
        with hosting.micro_batch(j):
            F.cross_entropy(model(images[rows]), labels[rows]).backward()
    hosting.finish()
    (g0, bn0), (g1, _) = alone
    assert all(torch.equal(p.grad, (a + b) / 2) for p, a, b in zip(model.parameters(), g0, g1))
    assert all(torch.equal(b, kept) for b, kept in zip(model.buffers(), bn0))  # virtual rank 0's statistics only


def test_a_resume_keeps_the_runs_virtual_ranks_and_global_batch_and_refuses_others_in_one_line(in_memory) -> None:
    fit, cfg, tmp = in_memory
    run = tmp / "run"
    fit(run, None, sets=["train.global_batch=16", "train.epochs=1"])  # 2 virtual ranks of 8 on this one process
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["virtual_ranks"], ckpt["global_batch"], ckpt["world_size"], ckpt["step"]) == (2, 16, 1, 6)
    assert ckpt["scheduler"]["samples"] == 6 * 16 and ckpt["config"]["train"]["virtual_ranks"] == 2
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    assert rows[0]["step"] == 4 and rows[0]["lr"] == pytest.approx(0.1 * 16 / 8 * 4 / 6)  # warm-up over 6 steps to
    # the peak scaled to the global batch
    assert [json.loads(line)["hosted"] for line in (run / "shapes.jsonl").read_text().splitlines()] == [2]

    for asked, said in (("train.virtual_ranks=4", "train.virtual_ranks = 4 but "),
                        ("train.global_batch=32", "train.global_batch = 32 but "),
                        ("train.batch_size=4", "train.batch_size = 4 but ")):
        with pytest.raises(ConfigError, match=said) as refused:
            fit(run, "auto", sets=[asked, "train.epochs=2"])
        assert "2 virtual ranks" in str(refused.value) and "global batch 16" in str(refused.value)
    assert fit(run, "auto", sets=["train.virtual_ranks=2", "train.epochs=2"])["step"] == 12


@pytest.mark.parametrize("sets, said", [
    (["train.global_batch=20"], "train.global_batch = 20 is not a multiple of train.batch_size = 8"),
    (["train.global_batch=16", "train.virtual_ranks=4"], "train.batch_size x train.virtual_ranks = 8 x 4 = 32"),
])
def test_a_global_batch_that_does_not_fit_the_batch_is_one_line(sets: list[str], said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(None, [*IN_MEMORY, *sets])


def test_the_schedules_state_is_in_samples_and_loads_only_into_the_same_global_batch() -> None:
    s = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024, warmup_epochs=1), 1024, 10, 3)
    for _ in range(7):
        s.step()
    state = s.state_dict()
    assert state["samples"] == 7 * 1024 and state["global_batch"] == 1024
    t = LRSchedule(OptimConfig(lr=0.6, reference_batch=1024, warmup_epochs=1), 1024, 10, 3)
    t.load_state_dict(state)
    assert t.step_count == 7 and t.lr(t.step_count) == s.lr(s.step_count)
    with pytest.raises(ValueError, match="not whole steps of this run's global batch 3072"):
        LRSchedule(OptimConfig(lr=0.6, reference_batch=1024), 3072, 10, 3).load_state_dict(state)
