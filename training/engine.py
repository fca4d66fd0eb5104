"""The training loop: `run` = preflight -> build -> fit, and each step a plain function.

One process per device. The same `run` serves `senet train` (one process or `--nproc N` local ones),
torchrun, and a Slurm task (slurm/ wraps it; nothing here knows about Slurm):

    summary = run(cfg, place_run(cfg), Path("runs/x"), resume="auto", control=RunControl())

or, with parts of one's own (`training.build`):

    r = build(cfg, place, out, data=Data(classes), loaders=(train_loader, None))
    try:
        summary = fit(r, resume=None)
    finally:
        r.close()

Exact resume: the initial weights come from `train.seed`; the loader's order and every augmentation
draw are functions of (seed, epoch, global position); any other randomness in a step (dropout) is
reseeded from (seed, step, virtual rank) before each micro-batch. So a checkpoint needs only state_dicts
and counters, and a run killed after any checkpoint and resumed ends bit-identical on CPU - on any
number of processes that divides its virtual ranks (`training.virtual`: a process hosts one or more,
one micro-batch each per step, and the step's gradient is their mean in one fixed order,
`training.accumulate`). The resolved config, each checkpoint and RUN/shapes.jsonl record the virtual
ranks and the global batch; the LR schedule, the step and epoch counters continue across a change of
shape as if none happened.

Per epoch: the training crop size is the loader's spec's for that epoch (progressive resizing,
`training.inputs`), logged as the epoch starts and written to the epoch's metrics row; with a weight
EMA (`training.ema`) every step folds the weights into it and every validation scores it beside the
raw weights; best.pt keeps the better of the two and says whose it is.

Checkpoints are taken at step boundaries with all ranks in step: every `train.checkpoint_every` steps,
every `train.checkpoint_every_min` minutes by rank 0's clock, at each epoch end (after validation, so
best.pt can be chosen), and when a `RunControl` asks (a signal handler on ANY rank may ask; the ranks
agree with one tiny all-reduce every `control.check_every` steps, on a CPU group so a GPU stream is never
synchronised for it). Rank 0 writes them in the background (training.checkpoint_writer); a requested stop
and the end of the run wait until the write has landed. A resume reads the newest checkpoint that
verifies, once, on rank 0 (training.checkpoint_resume).

Each finished step is reported to `training.health` (heartbeats: a hung, dead or failed rank is named,
and the loop leaves as one verdict) and `training.stragglers` (the rank the others wait for is named).

No host synchronisation in a step that neither logs nor checkpoints: the loss is accumulated on the
device (`StepMeter`), the loaders deliver device tensors without waiting, and fp16's loss scaling uses
the fused optimizer's on-device skip.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import dist as distmod
from training.build import Run, build, describe, preflight, use_virtual_ranks
from training.checkpoint import FORMAT_VERSION, CheckpointError
from training.checkpoint_folder import continued_manifest
from training.checkpoint_resume import read_resume
from training.checkpoint_writer import CheckpointWriter, settle
from training.config import Config, batch_layout, config_to_dict, dump_yaml
from training.control import RunControl
from training.metrics import plot_curves, read_metrics
from training.placement import Placement
from training.precision import Precision
from training.run_folder import CHECKPOINTS, CONFIG, CURVES, LAST, METRICS, SHAPES
from training.stall import StallMonitor
from training.virtual import on_resume
from training.weights import initialize_from

log = logging.getLogger("senet.train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """The counters of a run; with the state_dicts they make a checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one at an epoch boundary)
    step: int = 0  # optimizer steps taken since the start of the run
    mid_epoch: bool = False  # the loader holds a position inside `epoch`
    best_top1: float = -1.0
    best_weights: str = "raw"  # which weights scored best_top1: "raw", or "ema" (train.ema_decay)
    last_val: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ run
def run(cfg: Config, place: Placement, out_dir: Path, resume: str | None = "auto",
        control: RunControl | None = None) -> dict[str, Any]:
    """Train `cfg` in this process as rank `place.dist.rank` of `place.dist.world_size`; returns a summary.

    Args:
        cfg: the resolved configuration.
        place: where this process runs (`training.placement.place_run(cfg)`).
        out_dir: the run folder (checkpoints/, metrics.jsonl, curves.png, config.yaml).
        resume: "auto" (the newest checkpoint that verifies, if any), a checkpoint path, or None (start fresh).
        control: checkpoint/stop requests from outside the loop; None = never asked.

    Returns:
        step, epoch, stopped (True when a control request ended the run early), val_top1/val_top5 of the
        last validation, best_top1 and the checkpoint path.

    Raises:
        ConfigError: inconsistent configuration (e.g. model.num_classes vs the data's classes);
            PlacementError (a ConfigError): the node cannot host this rank as configured.
        DataError: unreadable data; CheckpointError: unusable checkpoint (ResumeError: none verifies),
            CheckpointWriteError: a checkpoint could not be written; NonFiniteLoss.
    """
    preflight(cfg)
    r = build(cfg, place, Path(out_dir), control=control)
    try:
        return fit(r, resume)
    finally:
        r.close()


def fit(r: Run, resume: str | None = "auto") -> dict[str, Any]:
    """Restore (or start fresh), train to `train.epochs` or a requested stop, draw the curves; the summary."""
    state = restore(r, resume)
    write_run_files(r, state)
    with r.health.guard():  # a hung, dead or failed rank leaves as one verdict naming it (training.health)
        summary = train(r, state)
    if r.place.is_main:
        plot_curves(read_metrics(r.out / METRICS), r.out / CURVES)
    return summary


def train(r: Run, state: TrainState) -> dict[str, Any]:
    """The epoch loop: train, validate, checkpoint; returns the run's summary."""
    cfg = r.cfg.train
    stopped = False
    stalls = StallMonitor.for_run(r)
    for epoch in range(state.epoch, cfg.epochs):
        if state.mid_epoch:
            state.mid_epoch = False  # the loader was positioned by `restore`
        else:
            r.train_loader.set_epoch(epoch)
        state.epoch = epoch
        crop = r.train_loader.crop_size  # the loader's spec says it; None for resident tensors
        if crop is not None and r.place.is_main:
            log.info("epoch %d: training crops of %d px", epoch + 1, crop)
        started, waited_before = time.perf_counter(), stalls.waited_s
        stopped = train_one_epoch(r, state, stalls)
        if stopped:
            break
        row = {"step": state.step, "epoch": epoch, "crop_size": crop, "epoch_s": round(time.perf_counter() - started, 3),
               "data_wait_s": round(stalls.waited_s - waited_before, 3)}
        if r.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            state.last_val = validate(r, epoch)
            row.update(state.last_val)
        r.log.write({k: v for k, v in row.items() if v is not None})
        state.epoch = epoch + 1
        improved = "val_top1" in row and best_of(state.last_val)[0] > state.best_top1
        if improved:
            state.best_top1, state.best_weights = best_of(state.last_val)
        save_checkpoint(r, state, best=improved)
    settle(r.checkpoints, r.group)  # the last checkpoint has landed (or every rank fails) before anything is reported
    waited = stalls.overall()
    if r.place.is_main:
        log.info("input: the ranks waited for data %.1f%% of the training time (pipeline starts included)", 100 * waited)
    return {"step": state.step, "epoch": state.epoch, "stopped": stopped, **state.last_val,
            "best_top1": state.best_top1, "best_weights": state.best_weights,
            "checkpoint": str(r.out / CHECKPOINTS / LAST), "data_wait_fraction": waited}


def validate(r: Run, epoch: int) -> dict[str, float]:
    """Top-1/top-5 of the raw weights and, with a weight EMA, of the EMA's (`val_top1_ema`, `val_top5_ema`)."""
    # Each rank's BN running statistics drift from rank 0's after its last forward; the checkpoint holds
    # rank 0's, so every rank evaluates with those (as `senet predict` on the checkpoint will), the EMA too.
    distmod.broadcast_buffers(r.model)
    layout = batch_layout(r.cfg, r.place.device)
    result = evaluate(r.model, r.val_loader, r.precision, len(r.classes), r.device, r.group, layout)
    text = f"val top-1 {result['val_top1']:.4f}, top-5 {result['val_top5']:.4f}"
    if r.ema is not None:
        with r.ema.applied(r.model) as averaged:
            ema = evaluate(averaged, r.val_loader, r.precision, len(r.classes), r.device, r.group, layout)
        result.update(val_top1_ema=ema["val_top1"], val_top5_ema=ema["val_top5"])
        text += f"; EMA top-1 {ema['val_top1']:.4f}, top-5 {ema['val_top5']:.4f}"
    if r.place.is_main:
        log.info("epoch %d: %s (%d images)", epoch + 1, text, result["val_images"])
    return result


def best_of(val: dict[str, float]) -> tuple[float, str]:
    """The better top-1 of a validation and whose it is: ("raw" wins a tie: it needs no EMA to reproduce)."""
    if val.get("val_top1_ema", -1.0) > val["val_top1"]:
        return val["val_top1_ema"], "ema"
    return val["val_top1"], "raw"


# ---------------------------------------------------------------------------------------- one epoch
def train_one_epoch(r: Run, state: TrainState, stalls: StallMonitor | None = None) -> bool:
    """Train over the rest of `state.epoch`; returns True when a control request stopped the run."""
    cfg = r.cfg.train
    steps_per_epoch = r.schedule.steps_per_epoch
    epoch_end = (state.epoch + 1) * steps_per_epoch
    meter = StepMeter(r.device, images_per_step=r.virtual.global_batch, stalls=stalls)
    layout = batch_layout(r.cfg, r.place.device)
    r.train_model.train()
    batches = iter(r.train_loader)  # one batch per hosted virtual rank and step, in virtual-rank order
    while True:
        t0 = time.perf_counter()
        micro = list(itertools.islice(batches, r.virtual.hosted))
        meter.waited(time.perf_counter() - t0)
        if len(micro) < r.virtual.hosted:
            break
        lr = r.schedule.apply(r.optimizer)
        loss = hosted_step(r, [prepare_batch(*batch, r.precision, layout) for batch in micro], state.step)
        r.schedule.step()
        state.step += 1
        if r.ema is not None:
            r.ema.update(state.step)
        r.health.step_done(state.step)
        r.stragglers.step_done()
        meter.add(loss)
        if state.step % cfg.log_every == 0:
            row = meter.flush(state.step, r.group)
            r.log.write({"step": state.step, "epoch": state.epoch, **row, "lr": lr})
            if r.place.is_main:
                log.info("epoch %d step %d/%d: loss %.4f lr %.4g %.0f img/s data wait %.0f%%", state.epoch + 1,
                         state.step - state.epoch * steps_per_epoch, steps_per_epoch, row["loss"], lr,
                         row["images_per_s"], 100 * row["data_wait_fraction"])
            r.stragglers.window_done(state.step, r.group, r.log)  # names the rank the others wait for
        requested = timed = False
        if state.step % r.control.check_every == 0:
            requested, timed = agree_on_requests(r.control, r.group, r.checkpoints)
        periodic = (state.step % cfg.checkpoint_every == 0 or timed) and state.step != epoch_end  # epoch end: after val
        if periodic or requested:
            meter.check_finite(state.step, r.group)
            state.mid_epoch = True  # the loader's position is the truth here, even at the epoch's last step
            path = save_checkpoint(r, state)
            if requested:
                settle(r.checkpoints, r.group)  # on disk before anyone acts on it (a Slurm requeue)
                stop = r.control.stop_after_checkpoint
                r.control.checkpoint_requested = False
                r.control.on_checkpoint_saved(path, state.step)
                if stop:
                    if r.place.is_main:
                        log.info("stopping after the requested checkpoint at step %d", state.step)
                    meter.finish()
                    return True
            state.mid_epoch = False
    meter.check_finite(state.step, r.group)
    meter.finish()
    return False


def hosted_step(r: Run, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
    """One SGD step of the virtual ranks this process hosts, one micro-batch each (`training.virtual`).

    Each micro-batch's randomness (dropout) is seeded from (seed, step, its virtual rank), and the step's
    gradient is the mean over all virtual ranks (`training.accumulate`), so a step is the same whichever
    process hosts which virtual rank. Returns the micro-batches' mean loss, on the device (no sync).
    """
    r.optimizer.zero_grad(set_to_none=True)
    losses = []
    for j, (images, labels) in enumerate(batches):
        seed_step(step_seed(r.cfg.train.seed, step, r.virtual.first + j), r.device)  # derivable on resume
        with r.gradients.micro_batch(j):
            losses.append(forward_backward(r.train_model, images, labels, r.scaler, r.precision,
                                           r.cfg.optim.label_smoothing))
    r.gradients.finish()
    r.scaler.step(r.optimizer)
    r.scaler.update()
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: Precision, label_smoothing: float) -> torch.Tensor:
    """One SGD step of one batch; returns the loss, detached and still on the device (no sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, images, labels, scaler, precision, label_smoothing)
    scaler.step(optimizer)
    scaler.update()
    return loss


def forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scaler: torch.amp.GradScaler,
                     precision: Precision, label_smoothing: float) -> torch.Tensor:
    """The loss of one batch and its (scaled) gradient, added to `.grad`; the loss detached, on the device."""
    with precision.autocast():
        loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
    scaler.scale(loss).backward()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, precision: Precision, num_classes: int, device: torch.device,
             group: Any = None, layout: str = "NCHW") -> dict[str, float]:
    """Top-1 and top-k (k = min(5, classes)) accuracy over the whole val set, BN in eval mode.

    Each image is counted once across ranks (the loader shards without padding); the correct and
    total counts are summed over ranks, never per-rank accuracies averaged.
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-k; summed on the device, no sync per batch
    images_seen = 0  # known on the host: no tensor for it
    for images, labels, _positions in loader:
        images, labels = prepare_batch(images, labels, precision, layout)
        with precision.autocast():
            logits = model(images)
        correct = logits.topk(k, dim=1).indices == labels[:, None]
        hits[0] += correct[:, 0].sum()
        hits[1] += correct.any(dim=1).sum()
        images_seen += labels.numel()
    counts = torch.cat([hits.cpu(), torch.tensor([images_seen])])
    distmod.all_reduce(counts, "sum", group)  # on the CPU group: a gloo group takes CPU tensors
    model.train(was_training)
    total = max(1, int(counts[2]))
    return {"val_top1": int(counts[0]) / total, "val_top5": int(counts[1]) / total, "val_images": int(counts[2])}


# ------------------------------------------------------------------------------------------- pieces
class StepMeter:
    """Loss, throughput and data-wait of the steps since the last log row, kept on the device.

    Nothing here synchronises the GPU per step: losses are summed on the device, and the first
    non-finite one is remembered there too; `flush` and `check_finite` sync once per call. The waits
    (host clocks) go to the run's stall alarm at each row (`training.stall`).
    """

    NONE = 2**62  # "no bad step yet"

    def __init__(self, device: torch.device, images_per_step: int, stalls: StallMonitor | None = None) -> None:
        self.device, self.images_per_step, self.stalls = device, images_per_step, stalls
        self.bad_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)  # steps seen, on the device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps, self.wait = 0, 0.0
        self.waits: list[float] = []  # per step, for the stall alarm
        self.start = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.wait += seconds
        self.waits.append(seconds)

    def add(self, loss: torch.Tensor) -> None:
        self.counter += 1
        self.loss_sum += loss.double()
        bad = ~torch.isfinite(loss)
        self.bad_step = torch.where(bad, torch.minimum(self.bad_step, self.counter), self.bad_step)
        self.steps += 1

    def check_finite(self, step: int, group: Any) -> None:
        """Raise NonFiniteLoss (on every rank) if any rank saw a NaN/inf loss; names the first such step."""
        first = self.bad_step.cpu().reshape(1)
        distmod.all_reduce(first, "min", group)
        if int(first) < self.NONE:
            bad = step - int(self.counter) + int(first)  # the meter counts from its creation
            raise NonFiniteLoss(f"loss is not finite at step {bad}; stopped, the last good checkpoint is kept")

    def flush(self, step: int, group: Any) -> dict[str, float]:
        """The log row of the window (loss averaged over steps and ranks); checks finiteness too."""
        self.check_finite(step, group)
        elapsed = time.perf_counter() - self.start
        if self.stalls is not None:
            self.stalls.window(step, self.waits, elapsed)
        sums = torch.tensor([float(self.loss_sum), float(self.steps), self.wait, elapsed], dtype=torch.float64)
        distmod.all_reduce(sums, "sum", group)
        world = max(1, torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1)
        loss, steps, wait, elapsed = sums.tolist()
        elapsed /= world
        row = {"loss": loss / max(1.0, steps), "images_per_s": self.images_per_step * steps / world / max(elapsed, 1e-9),
               "data_wait_fraction": min(1.0, wait / world / max(elapsed, 1e-9))}
        self._reset()
        return row

    def finish(self) -> None:
        """The steps after the last row of an epoch: they count in the run's overall data wait."""
        if self.stalls is not None and self.waits:
            self.stalls.tail(self.waits, time.perf_counter() - self.start)
        self._reset()


def agree_on_requests(control: RunControl, group: Any, checkpoints: CheckpointWriter | None = None) -> tuple[bool, bool]:
    """All ranks learn, with one MAX all-reduce: whether any rank was asked for a checkpoint (and a stop), and
    rank 0's checkpoint news - a timed checkpoint is due by its clock, or its last write failed.

    Returns:
        (a checkpoint was requested, a timed checkpoint is due).

    Raises:
        CheckpointWriteError: on every rank, when rank 0 could not write its last checkpoint.
    """
    news = (checkpoints.time_due(), checkpoints.failed()) if checkpoints is not None else (False, False)
    flags = torch.tensor([int(control.checkpoint_requested), int(control.stop_after_checkpoint), *map(int, news)],
                         dtype=torch.int32)
    distmod.all_reduce(flags, "max", group)
    if checkpoints is not None and flags[3]:
        checkpoints.raise_failure()
    control.stop_after_checkpoint = bool(flags[1])
    control.checkpoint_requested = bool(flags[0])
    return control.checkpoint_requested, bool(flags[2])


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, precision: Precision,
                  layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader tensors -> model inputs: NCHW view (channels_last memory for NHWC), dtype, int64 labels."""
    if layout == "NHWC":
        images = images.permute(0, 3, 1, 2)  # a view: NCHW shape over channels_last memory, no copy
    if not precision.enabled and images.dtype != torch.float32:
        images = images.float()
    return images, labels.reshape(-1).to(images.device, torch.int64, non_blocking=True)  # labels come on the host


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and this rank's GPU generator only (not every visible GPU's, per step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: set by init_distributed


def step_seed(seed: int, step: int, rank: int) -> int:
    """A torch seed that is a pure function of (seed, step, rank), for randomness inside the model."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


# -------------------------------------------------------------------------------------- checkpoints
def write_run_files(r: Run, state: TrainState) -> None:
    """The resolved config next to the checkpoints, and this start's shape appended to shapes.jsonl (rank 0).

    shapes.jsonl (append-only) has one row per start of the run: the step it starts from, its processes,
    nodes and processes per node, its virtual ranks and global batch, and what the launcher adds
    (`RunControl.shape_facts`: a Slurm job and attempt).
    """
    if not r.place.is_main:
        return
    r.out.mkdir(parents=True, exist_ok=True)
    (r.out / CONFIG).write_text(dump_yaml(r.cfg))
    per_node: dict[str, int] = {}
    for info in r.health.infos.values():
        per_node[info.node] = per_node.get(info.node, 0) + 1
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": state.step, "epoch": state.epoch,
           "world_size": r.place.dist.world_size, "nodes": len(per_node), "tasks_per_node": max(per_node.values()),
           "virtual_ranks": r.virtual.total, "hosted": r.virtual.hosted, "global_batch": r.virtual.global_batch,
           **r.control.shape_facts()}
    with open(r.out / SHAPES, "a") as f:
        f.write(json.dumps(row) + "\n")


def checkpoint_state(r: Run, state: TrainState) -> dict[str, Any]:
    """The checkpoint dict: state_dicts, counters, class list and resolved config."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "training",
        "model": r.model.state_dict(),  # unwrapped: no `module.` / `_orig_mod.` prefixes
        "optimizer": r.optimizer.state_dict(),
        "scaler": r.scaler.state_dict(),
        "scheduler": r.schedule.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "mid_epoch": state.mid_epoch,
        "loader": r.train_loader.state_dict(),  # epoch + global position: all a resumed loader needs
        "classes": list(r.classes),  # index -> WNID
        "arch": r.cfg.model.arch,
        "num_classes": r.cfg.model.num_classes,
        "world_size": r.place.dist.world_size,
        "virtual_ranks": r.virtual.total,  # training.virtual: fixed when the run started, kept by every resume
        "global_batch": r.virtual.global_batch,
        "best_top1": state.best_top1,
        "best_weights": state.best_weights,  # which weights scored best_top1: "raw" or "ema"
        "last_val": dict(state.last_val),
        "config": config_to_dict(r.cfg),
        "ema": r.ema.state_dict() if r.ema is not None else None,  # training.ema: the weight EMA, one entry
    }


def save_checkpoint(r: Run, state: TrainState, best: bool = False) -> Path:
    """Hand this boundary's checkpoint to rank 0's writer (every rank calls this at the same step boundary).

    Rank 0 waits for its previous write, copies the state to host memory and goes on; the file (returned)
    lands in the background. Each landed write goes to metrics.jsonl as a `checkpoint` event with its
    write time (fsync and read-back included) and the step loop's stall: a Slurm job's signal delay and
    GraceTime must cover CHECK_EVERY steps, one stall and one write.
    """
    val = state.best_top1 if best else None  # the better of the raw and the EMA weights' top-1
    return r.checkpoints.submit(lambda: checkpoint_state(r, state), state.step, state.epoch, best, val)


def restore(r: Run, resume: str | None) -> TrainState:
    """Load the checkpoint `resume` asks for into the run's objects (or start fresh); trims metrics.jsonl to its step.

    Rank 0 reads and verifies the file and hands its bytes to the other ranks (training.checkpoint_resume).
    """
    folder = r.out / CHECKPOINTS
    resumed = read_resume(resume, folder, r.group, r.place.is_main)
    if resumed is None:
        use_virtual_ranks(r, r.virtual)
        if r.place.is_main:
            log.info("%s", describe(r))
            r.checkpoints.start(continued_manifest(folder, None, None, 0))
        if r.place.is_main and r.log.path.is_file():
            r.log.truncate_after(0)  # a fresh run in a used folder: start the log afresh too
        if r.cfg.train.init_from:  # a fresh run only: a resume continues from its own checkpoint
            done = initialize_from(r.model, r.cfg.model.arch, r.classes, Path(r.cfg.train.init_from).expanduser(),
                                   r.cfg.train.init_weights)
            if r.ema is not None:
                r.ema.reset(r.model)  # the average starts at the weights the run starts from
            if r.place.is_main:
                log.info("%s", done)
        return TrainState()
    ckpt, path = resumed.state, resumed.path
    for key, ours in (("arch", r.cfg.model.arch), ("num_classes", r.cfg.model.num_classes), ("classes", list(r.classes))):
        if ckpt[key] != ours:
            shown = "the class list" if key == "classes" else f"{key} {ckpt[key]!r}"
            raise CheckpointError(f"{path}: holds {shown}, this run has a different one; start a new --out or --resume none")
    dist = r.place.dist
    use_virtual_ranks(r, on_resume(r.cfg, ckpt, str(path), dist.world_size, dist.rank))  # the run's, on this world
    r.model.load_state_dict(ckpt["model"])
    r.optimizer.load_state_dict(ckpt["optimizer"])
    r.scaler.load_state_dict(ckpt["scaler"])
    try:
        r.schedule.load_state_dict(ckpt["scheduler"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    restore_ema(r, ckpt, path)
    state = TrainState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), mid_epoch=bool(ckpt["mid_epoch"]),
                       best_top1=float(ckpt["best_top1"]), best_weights=str(ckpt["best_weights"]),
                       last_val=dict(ckpt["last_val"]))
    if state.mid_epoch:
        r.train_loader.load_state_dict(ckpt["loader"])
    if r.place.is_main:
        r.checkpoints.start(continued_manifest(folder, resumed.candidate, resumed.digest, state.epoch))
        r.log.truncate_after(state.step)
        r.log.write({"event": "resume", "step": state.step})
        if resumed.note:
            log.warning("%s", resumed.note)
        log.info("resumed from step %d (epoch %d, %s)", state.step, state.epoch + 1, path)
        log.info("%s", describe(r))
    return state


def restore_ema(r: Run, ckpt: dict[str, Any], path: Path) -> None:
    """The checkpoint's weight EMA into the run's; a run that turns the EMA on at a resume starts it at the
    restored weights (said once)."""
    if r.ema is None:
        return
    if ckpt.get("ema"):
        try:
            r.ema.load_state_dict(ckpt["ema"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return
    r.ema.reset(r.model)
    if r.place.is_main:
        log.warning("%s holds no weight EMA (train.ema_decay was null when it was written): the EMA starts now, at "
                    "the restored weights", path)
