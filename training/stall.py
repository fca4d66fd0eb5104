"""The stall alarm: is a run waiting for its input, where did the loader's time go, and what to change.

At every log row `StallMonitor.window` gathers each rank's window (the engine's host-side waits for
the next batch and the loader's own host timings, `pipeline.loader.InputTimes`) on the CPU control
group, and rank 0 logs ONE warning when some rank waited for data more than `train.data_wait_warn`
of the window's time: which ranks on which nodes, how much, where the loader saw the time go (the
Python workers' file reads, waiting for the DALI graph, the copy, the colour pass), the setting to
try first and the `bench-input` commands that split the stages and search the settings. A pipeline's
(re)start (building it, filling its queues at an epoch's start) is not counted by the alarm; the
run's overall fraction (`StallMonitor.overall`, in the end-of-run summary) counts everything.

Nothing here runs per step on a device: the waits are host clocks, gathered only at log rows.
`bench-train` names the bound of a config with the same reading (`bound_verdict`).
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from pipeline.loader import InputTimes
from pipeline.pack_reader import is_pack
from training.build import Run
from training.config import Config
from training.placement import Placement

log = logging.getLogger("senet.train")

# The longest tenth of a window's steps holding this share of its wait: the pipeline keeps pace on
# average but not always, which a deeper queue absorbs. Judged only on windows of enough steps.
BURSTY, BURST_MIN_STEPS = 0.6, 10
# A worker's read time per batch against the step: the reads alone (nearly) fill the time between batches.
READS_SET_PACE = 0.7
# Workers this idle give their cores to DALI's threads better (when data.threads follows the share).
IDLE_WORKERS = 0.25
MAX_NODES_NAMED = 4


def node_name() -> str:
    """This host's name as Slurm knows it (SLURMD_NODENAME: `hostname` is the same on a multi-slurmd host)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


@dataclass(frozen=True)
class InputContext:
    """The input settings in force on a rank and where its data lives: what the advice depends on."""

    device: str
    threads: int
    py_workers: int
    cpus: int  # this rank's CPU share
    prefetch: int
    hw_decoder_load: float
    data: str
    packed: bool
    staged: bool
    batch_size: int
    crop_size: int

    @classmethod
    def of(cls, cfg: Config, place: Placement) -> InputContext:
        root = cfg.data.root
        return cls(device=place.device, threads=place.dali_threads, py_workers=place.py_workers, cpus=place.cpus,
                   prefetch=cfg.data.prefetch, hw_decoder_load=cfg.data.hw_decoder_load, data=root,
                   packed=bool(root) and is_pack(Path(root).expanduser()), staged=bool(cfg.data.stage_dir),
                   batch_size=cfg.train.batch_size, crop_size=cfg.data.crop_size)

    def bench_command(self) -> str:
        """`senet bench-input` with this rank's settings: the per-stage split of what training iterates."""
        return (f"senet bench-input {self.data or 'DATA'} --device {self.device} --batch-size {self.batch_size} "
                f"--crop-size {self.crop_size} --threads {self.threads} --py-workers {self.py_workers} "
                f"--prefetch {self.prefetch}")

    def tune_command(self) -> str:
        """`senet bench-input --tune` within this rank's CPU share."""
        return (f"senet bench-input {self.data or 'DATA'} --tune --device {self.device} --batch-size "
                f"{self.batch_size} --crop-size {self.crop_size} --cpus {self.cpus}")


@dataclass(frozen=True)
class RankWindow:
    """One rank's log window: the engine's waits and clock, its loader's host times (seconds)."""

    rank: int
    node: str
    wait_s: float  # blocked in the loader, over the window's steps
    elapsed_s: float
    steps: int
    startup_s: float = 0.0  # of which a pipeline's (re)start
    batches: int = 0  # batches the loader timed; 0: the loader says nothing about its time
    read_s: float = 0.0
    graph_s: float = 0.0
    copy_s: float = 0.0
    colour_s: float = 0.0
    burst: float = 0.0  # share of the wait in the window's longest tenth of steps

    @property
    def fraction(self) -> float:
        """The data-wait fraction of the window, a pipeline's (re)start not counted."""
        busy = self.elapsed_s - self.startup_s
        return min(1.0, max(0.0, self.wait_s - self.startup_s) / busy) if busy > 0 else 0.0

    @classmethod
    def measured(cls, rank: int, node: str, waits: Sequence[float], elapsed_s: float,
                 times: InputTimes | None) -> RankWindow:
        """The window of `waits` (one per step) and `elapsed_s`, with the loader's `times` when it keeps them."""
        times = times or InputTimes()
        ordered = sorted(waits, reverse=True)
        if times.startup_s > 0 and ordered:
            ordered = ordered[1:]  # the (re)start's batch: not a sign of a bursty pipeline
        total = sum(ordered)
        top = sum(ordered[:max(1, math.ceil(len(ordered) / 10))])
        return cls(rank=rank, node=node, wait_s=float(sum(waits)), elapsed_s=elapsed_s, steps=len(waits),
                   startup_s=times.startup_s, batches=times.batches, read_s=times.read_s, graph_s=times.graph_s,
                   copy_s=times.copy_s, colour_s=times.colour_s, burst=top / total if total > 0 else 0.0)

    def numbers(self) -> list[float]:
        """The fields after rank and node, as floats (what the ranks gather)."""
        return [float(getattr(self, f.name)) for f in fields(self)[2:]]

    @classmethod
    def from_numbers(cls, rank: int, node: str, values: Sequence[float]) -> RankWindow:
        names = [f.name for f in fields(cls)[2:]]
        kinds = {"steps": int, "batches": int}
        return cls(rank, node, **{n: kinds.get(n, float)(v) for n, v in zip(names, values)})


@dataclass(frozen=True)
class Diagnosis:
    """Where a window's input time went and what to try: `knob` first, then `then` (empty: no input setting)."""

    limit: str  # "reads", "graph", "after" (copy and colour pass) or "unknown"
    where: str
    verdict: str
    knob: str = ""
    then: tuple[str, ...] = ()

    def advice(self) -> str:
        if self.limit == "unknown":
            return "bench-input measures this config's DALI input alone"
        if not self.knob:
            return "no input setting moves it"
        return f"try {self.knob} first" + "".join(f", then {t}" for t in self.then)


def diagnose(w: RankWindow, ctx: InputContext) -> Diagnosis:
    """Read a stalled window: which part of the input set the pace, and the setting to try first.

    The loader observes, per batch: the source's file reads (in Python workers, in parallel; without
    workers inside the graph wait of this process), the time blocked waiting for the DALI graph
    (decode and augmentation together), the copy into torch tensors and the colour pass.
    """
    if w.batches == 0:
        return Diagnosis("unknown", "no breakdown (this loader keeps no timings)", "unknown")
    workers, inline = ctx.py_workers, ctx.py_workers == 0
    read = w.read_s / w.batches
    graph = max(0.0, w.graph_s / w.batches - (read if inline else 0.0))
    copy, colour = w.copy_s / w.batches, w.colour_s / w.batches
    step = max(w.elapsed_s - w.startup_s, 0.0) / max(1, w.steps)
    wait = max(w.wait_s - w.startup_s, 0.0) / max(1, w.steps)
    target = "the GPU" if ctx.device == "gpu" else "torch tensors"
    where = (f"per batch: file reads {_ms(read)} ("
             + ("in this process, inside the graph wait" if inline else f"spread over {workers} Python worker(s)")
             + f"), waiting for the DALI graph (decode + augmentation) {_ms(graph)}, copy to {target} {_ms(copy)}, "
             f"colour pass {_ms(colour)}; a step took {_ms(step)}, {_ms(wait)} of it waiting")
    if copy + colour > 0.5 * wait and copy + colour >= max(graph, read if inline else 0.0):
        if ctx.device == "gpu":
            return Diagnosis("after", where, "launching the copy and the colour pass waited for a busy GPU: the GPU "
                             "sets the pace, not the input")
        return Diagnosis("after", where, "the copy and the colour pass run on the training thread and cannot run "
                         "ahead: they are the augmentation's own cost on a CPU rank")
    reads_limit = read >= graph if inline else read / workers >= READS_SET_PACE * step
    if reads_limit:
        options = []
        if inline or workers < 4:
            options.append(f"data.py_workers={max(2, 2 * workers)}")
        if not ctx.packed:
            options.append("a pack (senet pack, then data.root=PACK: few large files, read by offset)")
        elif not ctx.staged:
            options.append("data.stage_dir (a node-local copy of the pack)")
        if workers >= 4:
            options.append(f"data.py_workers={2 * workers}")
        return Diagnosis("reads", where, "the file reads set the pace", options[0], tuple(options[1:]))
    options = []
    if w.steps >= BURST_MIN_STEPS and w.burst >= BURSTY:
        options.append(f"data.prefetch={min(16, ctx.prefetch + 2)} (the waits come in bursts)")
    share = max(1, ctx.cpus - workers)
    if ctx.threads < share:
        options.append(f"data.threads={share}")
    if workers >= 2 and read / workers < IDLE_WORKERS * step:
        options.append(f"data.py_workers={workers // 2} (the workers are mostly idle; data.threads: null gives "
                       f"their cores to DALI)")
    if ctx.device == "gpu":
        options.append(f"data.hw_decoder_load (now {ctx.hw_decoder_load:g}; --tune measures 0 to 1)")
    options.append(f"more CPU cores per rank (slurm.cpus_per_task, or fewer ranks per node; this rank has {ctx.cpus})")
    if not any(o.startswith("data.prefetch") for o in options):
        options.append(f"data.prefetch={min(16, ctx.prefetch + 2)}")
    return Diagnosis("graph", where, "the DALI graph sets the pace", options[0], tuple(options[1:]))


def name_ranks(windows: Sequence[RankWindow]) -> str:
    """'rank 0 on node1', 'ranks 0-3,6 on node1, rank 9 on node2', '...and N more nodes'."""
    by_node: dict[str, list[int]] = {}
    for w in sorted(windows, key=lambda w: w.rank):
        by_node.setdefault(w.node, []).append(w.rank)
    parts = [f"rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)} on {node}" for node, ranks in by_node.items()]
    more = len(parts) - MAX_NODES_NAMED
    return ", ".join(parts[:MAX_NODES_NAMED]) + (f" and {more} more node(s)" if more > 0 else "")


def stall_message(windows: Sequence[RankWindow], threshold: float, ctx: InputContext, last_step: int) -> str | None:
    """The one-line warning of a window, or None when no rank waited for data more than `threshold`."""
    stalled = [w for w in windows if w.fraction > threshold]
    if not stalled:
        return None
    worst = max(stalled, key=lambda w: w.fraction)
    lo, hi = min(w.fraction for w in stalled), worst.fraction
    share = f"{hi:.0%}" if round(100 * lo) == round(100 * hi) else f"{lo:.0%}-{hi:.0%}"
    d = diagnose(worst, ctx)
    first = last_step - worst.steps + 1
    return (f"input stall in steps {first}-{last_step}: {name_ranks(stalled)} waited for data {share} of the time "
            f"(train.data_wait_warn {threshold:.0%}); rank {worst.rank}'s loader, {d.where}: {d.verdict}; "
            f"{d.advice()}; per-stage split: {ctx.bench_command()}; settings search: {ctx.tune_command()}")


def bound_verdict(real_step_s: float, synthetic_step_s: float, window: RankWindow, ctx: InputContext,
                  threshold: float) -> dict[str, Any]:
    """`bench-train`'s reading: input-bound when the real-data steps waited for data more than `threshold`.

    The synthetic step (the batch already on the device) is what the model alone takes. On a CPU rank the
    input and the model share the cores, so the verdict comes from the real run's own waits; the
    difference between the two steps is then the input's CPU cost, not a wait.
    """
    fraction = window.fraction
    steps = f"{_ms(real_step_s)}/step with real data, {_ms(synthetic_step_s)} with the batch already on the device"
    if fraction > threshold:
        d = diagnose(window, ctx)
        text = (f"input-bound: the real-data steps waited for data {fraction:.0%} of the time (the alarm's threshold, "
                f"train.data_wait_warn, is {threshold:.0%}); {steps}; {d.where}: {d.verdict}; {d.advice()}; "
                f"per-stage split: {ctx.bench_command()}; settings search: {ctx.tune_command()}")
        return {"bound": "input", "text": text, "knob": d.knob, "then": list(d.then), "limit": d.limit}
    if ctx.device == "gpu":
        text = (f"compute-bound: the real-data steps waited for data {fraction:.1%} of the time; {steps}: the model's "
                f"step sets the pace (precision, channels_last, train.compile move it; input settings do not)")
    else:
        cost = max(0.0, real_step_s / synthetic_step_s - 1) if synthetic_step_s > 0 else 0.0
        text = (f"compute-bound: the real-data steps waited for data {fraction:.1%} of the time; {steps}: on a CPU the "
                f"input and the model share the cores, so the input's work makes the step {cost:.0%} longer "
                f"without the model ever waiting for a batch")
        if cost > 0.5:  # the input takes a large part of the cores: fewer DALI threads leave the model more
            text += (f"; the input's threads take the model's cores: fewer data.threads (now {ctx.threads}) or a "
                     f"cheaper input leave the model more")
    return {"bound": "compute", "text": text, "knob": "", "then": [], "limit": "model"}


class StallMonitor:
    """The alarm of one run: fed by `training.engine.StepMeter` at log rows and at each epoch's end."""

    def __init__(self, threshold: float, ctx: InputContext, loader: Any, group: Any, rank: int, is_main: bool) -> None:
        self.threshold, self.ctx, self.loader, self.group = threshold, ctx, loader, group
        self.rank, self.is_main = rank, is_main
        self.nodes = _gather_objects(node_name(), group)  # once per run: names do not change
        self.waited_s, self.elapsed_s = 0.0, 0.0
        self.warnings = 0

    @classmethod
    def for_run(cls, r: Run) -> StallMonitor:
        return cls(r.cfg.train.data_wait_warn, InputContext.of(r.cfg, r.place), r.train_loader, r.group,
                   r.place.dist.rank, r.place.is_main)

    def window(self, step: int, waits: Sequence[float], elapsed_s: float) -> str | None:
        """A log row's window on every rank (one gather on the CPU group); rank 0 warns. Returns the warning."""
        mine = self._measure(waits, elapsed_s)
        rows = _gather_numbers(mine.numbers(), self.group)
        windows = [RankWindow.from_numbers(rank, self.nodes[rank], row) for rank, row in enumerate(rows)]
        message = stall_message(windows, self.threshold, self.ctx, step)
        if message and self.is_main:
            self.warnings += 1
            log.warning("%s", message)
        return message

    def tail(self, waits: Sequence[float], elapsed_s: float) -> None:
        """The steps after an epoch's last log row: counted in the overall fraction, never gathered."""
        self._measure(waits, elapsed_s)

    def overall(self) -> float:
        """The data-wait fraction of the run's training time over all ranks (one all-reduce, at the end)."""
        sums = torch.tensor([self.waited_s, self.elapsed_s], dtype=torch.float64)
        if tdist.is_initialized():
            tdist.all_reduce(sums, group=self.group)
        waited, elapsed = sums.tolist()
        return min(1.0, waited / elapsed) if elapsed > 0 else 0.0

    def _measure(self, waits: Sequence[float], elapsed_s: float) -> RankWindow:
        take = getattr(self.loader, "take_timings", None)  # a TrainLoader keeps them; a ResidentLoader has none
        window = RankWindow.measured(self.rank, self.nodes[self.rank], waits, elapsed_s, take() if take else None)
        self.waited_s += window.wait_s
        self.elapsed_s += elapsed_s
        return window


def _gather_numbers(values: list[float], group: Any) -> list[list[float]]:
    """Every rank's `values`, in rank order (a single process: its own)."""
    if not tdist.is_initialized():
        return [values]
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def _gather_objects(value: Any, group: Any) -> list[Any]:
    if not tdist.is_initialized():
        return [value]
    out: list[Any] = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(out, value, group=group)
    return out


def _ranges(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
