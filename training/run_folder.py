"""The layout of a run folder, named once: `senet train --out RUN`, a Slurm job's run folder and the tools
that read them (predict, the demo's report, the Slurm commands) all agree on it.

    RUN/config.given.yaml    the config file as written     RUN/checkpoints/last.pt   -> the newest checkpoint
    RUN/config.yaml          resolved (overrides applied)   RUN/checkpoints/best.pt   -> best val top-1 so far
    RUN/metrics.jsonl        one JSON row per log step, validation, resume and checkpoint write
    RUN/curves.png           loss, learning rate and validation accuracy against the step
    RUN/checkpoints/ckpt-<step>.pt and manifest.json: the kept checkpoints and their sha256 (checkpoint_folder)
    RUN/health/<session>/    each rank's heartbeat, and the verdict naming a failed rank (training.health)
    RUN/shapes.jsonl         append-only, one row per start: step, processes, nodes, virtual ranks (training.engine)

A Slurm job adds its own (job.json, logs/, code/: slurm.job_folder).
"""
from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
METRICS, CURVES = "metrics.jsonl", "curves.png"
CONFIG, GIVEN_CONFIG = "config.yaml", "config.given.yaml"
HEALTH = "health"
SHAPES = "shapes.jsonl"
RUNS = Path("runs")  # where `senet train` puts a run folder unless --out says otherwise


def default_out(config: str | Path) -> Path:
    """runs/<config name>: a rerun of the same command resumes the same run."""
    return RUNS / Path(config).stem


def save_given_config(config: str | Path, out: Path) -> None:
    """The config file as the user wrote it, next to the resolved one."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / GIVEN_CONFIG)
