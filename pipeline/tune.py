"""`senet bench-input --tune`: the input settings that feed the most images per second within a CPU share.

Searched (never the batch size: that belongs to the recipe), in stages, each from the best so far:

  1. split     the CPU share between DALI threads and Python workers: workers 0, 1, 2, 4, 8, ... and
               threads = share - workers, plus the defaults
  2. prefetch  1 to 4 batches ahead, at the best split
  3. hw_decoder_load (GPU only) 0, 0.4, 0.65, 0.8 and 1, at the best so far

Each candidate is measured as `bench-input`'s `full` stage is (the TrainLoader as training iterates
it), `repeats` times in interleaved rounds: every round measures each candidate of the stage once, in
a rotated order, so slow phases of a shared machine fall on all of them alike and each candidate's
spread (max - min of its runs) shows how much the noise moves it. A first run of the defaults is a
warm-up (page cache, imports) and tells what one run costs; it is not counted. The defaults are
measured in every stage. The fastest candidate (by median) is recommended only when its median beats
the defaults' by more than the noise, the larger of the two spreads (`beats_noise`); otherwise the
defaults stay. A stage that the rest of `budget_s` cannot hold is trimmed (the defaults and the best
so far stay in it) or skipped, and the result says which.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from pipeline.bench import BenchSpec, measure_stage
from pipeline.datasets import ImageIndex

PREFETCH_DEPTHS = (1, 2, 3, 4)
HW_DECODER_LOADS = (0.0, 0.4, 0.65, 0.8, 1.0)


class BudgetTooSmall(ValueError):
    """The budget holds no comparison at all; the message says what one run costs."""


@dataclass(frozen=True)
class InputSettings:
    """One candidate: the input settings `--tune` varies (named as the `data.*` keys that set them)."""

    threads: int
    py_workers: int
    prefetch: int
    hw_decoder_load: float | None = None  # None on the CPU, where there is no hardware decoder

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Candidate:
    """A candidate's measured rates (images/s), one per run."""

    settings: InputSettings
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else 0.0

    @property
    def spread(self) -> float:
        """max - min of the runs: how much the machine's noise moved this candidate."""
        return max(self.runs) - min(self.runs) if self.runs else 0.0

    def entry(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "images_per_s": self.median}


def beats_noise(candidate: Candidate, default: Candidate) -> tuple[bool, float]:
    """The decision rule: does `candidate` beat the defaults by more than the noise? Returns (wins, noise).

    The noise is the larger spread of the two; a tie or a smaller margin keeps the defaults.
    """
    noise = max(candidate.spread, default.spread)
    wins = candidate.settings != default.settings and candidate.median - default.median > noise
    return wins, noise


@dataclass
class TuneResult:
    """What `tune` found: every candidate best first, the defaults, and the recommendation."""

    default: Candidate
    fastest: Candidate
    best: Candidate  # the recommendation: `fastest` when it beats the noise, else the defaults
    noise: float
    candidates: list[Candidate]
    skipped: list[str]
    elapsed_s: float
    repeats: int
    budget_s: float

    @property
    def recommended_change(self) -> bool:
        return self.best is not self.default

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default.entry(), "best": self.best.entry(), "fastest": self.fastest.entry(),
                "recommended_change": self.recommended_change, "noise_images_per_s": self.noise,
                "gain_images_per_s": self.fastest.median - self.default.median, "repeats": self.repeats,
                "budget_s": self.budget_s, "elapsed_s": self.elapsed_s, "skipped": self.skipped,
                "candidates": [{**c.entry(), "runs": c.runs, "spread": c.spread, "default": c is self.default}
                               for c in self.candidates]}


def split_candidates(cpus: int, base: InputSettings) -> list[InputSettings]:
    """The share split between DALI threads and Python workers: workers 0, 1, 2, 4, ... below the share."""
    workers = [0] + [w for w in (1, 2, 4, 8, 16, 32, 64) if w < cpus]
    return [replace(base, threads=cpus - w, py_workers=w) for w in workers]


def stages(cpus: int, gpu: bool) -> list[tuple[str, Callable[[InputSettings], list[InputSettings]]]]:
    """The search's stages: a name and the candidates it tries around the best settings so far."""
    found: list[tuple[str, Callable[[InputSettings], list[InputSettings]]]] = [
        ("split", lambda best: split_candidates(cpus, best)),
        ("prefetch", lambda best: [replace(best, prefetch=p) for p in PREFETCH_DEPTHS])]
    if gpu:
        found.append(("hw_decoder_load", lambda best: [replace(best, hw_decoder_load=h) for h in HW_DECODER_LOADS]))
    return found


def tune(default: InputSettings, cpus: int, measure: Callable[[InputSettings], float], *, budget_s: float,
         repeats: int = 3, gpu: bool = False, clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """Search the input settings (see the module docstring).

    Args:
        default: the settings training uses when none is given: always a candidate.
        cpus: the CPU share the split divides (threads + workers).
        measure: images/s of one run with the given settings (`full_stage` for the real thing).
        budget_s: seconds the whole search may take (by `clock`).
        repeats: runs per candidate and stage, interleaved (at least 2, or no noise is known).
        gpu: search hw_decoder_load too.

    Raises:
        ValueError: repeats < 2 or cpus < 1. BudgetTooSmall: not even the first stage fits in `budget_s`.
    """
    if repeats < 2 or cpus < 1:
        raise ValueError(f"repeats={repeats} must be >= 2 (the noise comes from them) and cpus={cpus} >= 1")
    start = clock()
    pool: dict[InputSettings, Candidate] = {}
    costs: list[float] = []

    def run(settings: InputSettings, counted: bool = True) -> None:
        began = clock()
        rate = measure(settings)
        costs.append(clock() - began)
        if counted:
            pool.setdefault(settings, Candidate(settings)).runs.append(rate)

    run(default, counted=False)  # warm-up, and what one run costs
    best, skipped = default, []
    for name, around in stages(cpus, gpu):
        kept = list(dict.fromkeys([default, best]))
        new = [s for s in dict.fromkeys(around(best)) if s not in kept]
        left = budget_s - (clock() - start)
        fits = int(left // (max(costs) * repeats)) - len(kept)
        if fits < 1:
            skipped.append(f"{name}: all {len(new)} candidates (the budget left, {max(0.0, left):.0f} s, holds no "
                           f"more rounds)")
            continue
        if fits < len(new):
            skipped.append(f"{name}: {len(new) - fits} of {len(new)} candidates (budget): "
                           + "; ".join(label(s) for s in new[fits:]))
            new = new[:fits]
        group = kept + new
        for r in range(repeats):
            for settings in group[r % len(group):] + group[:r % len(group)]:
                run(settings)
        best = max(pool.values(), key=lambda c: c.median).settings
    if default not in pool:
        raise BudgetTooSmall(f"a budget of {budget_s:g} s holds no comparison: one run took {max(costs):.1f} s and "
                             f"the first stage needs {repeats} runs of at least 2 candidates; raise the budget or "
                             f"measure fewer batches per run")
    ranked = sorted(pool.values(), key=lambda c: c.median, reverse=True)
    fastest, base = ranked[0], pool[default]
    wins, noise = beats_noise(fastest, base)
    return TuneResult(default=base, fastest=fastest, best=fastest if wins else base, noise=noise, candidates=ranked,
                      skipped=skipped, elapsed_s=clock() - start, repeats=repeats, budget_s=budget_s)


def full_stage(index: ImageIndex, spec: BenchSpec) -> Callable[[InputSettings], float]:
    """The real measurer: `bench-input`'s `full` stage of `spec` with a candidate's settings."""
    def measure(s: InputSettings) -> float:
        hw = spec.runtime.hw_decoder_load if s.hw_decoder_load is None else s.hw_decoder_load
        candidate = spec.with_runtime(threads=s.threads, py_workers=s.py_workers, prefetch=s.prefetch,
                                      hw_decoder_load=hw)
        return measure_stage(index, "full", candidate).images_per_s
    return measure


def label(s: InputSettings) -> str:
    """'threads 2, py_workers 0, prefetch 2' (for tables and messages)."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.as_dict().items())
