"""The run's metrics: `OUT/metrics.jsonl` (one JSON object per line), `OUT/curves.png`, and TensorBoard
event files in OUT (when the optional `tensorboard` package is installed: `pip install 'senet[tensorboard]'`;
`tensorboard --logdir OUT`, or a folder of run folders).

Rows carry the optimizer `step` they were logged at. Training rows: step, epoch, loss, lr, images_per_s,
data_wait_fraction. Epoch rows, at each epoch's end: step, epoch, crop_size (the epoch's training crop
side), epoch_s and data_wait_s (this rank's seconds training the epoch and waiting for data in it; a
resumed epoch counts from the resume), and after a validation val_top1, val_top5 (fractions in [0, 1])
and, with a weight EMA, val_top1_ema and val_top5_ema. Events:
`{"event": "resume", "step": N}` and `{"event": "checkpoint", "step": N, "write_s": S}`. A resumed run
first drops every row logged after its checkpoint's step, so the file reads as one uninterrupted run
plus the events; TensorBoard is told the same (its writer purges the later steps of earlier sessions).

TensorBoard scalar tags (`TENSORBOARD_TAGS`): train/loss, train/lr, train/images_per_s,
train/data_wait_fraction, train/crop_size, val/top1, val/top5, val/top1_ema, val/top5_ema,
checkpoint/write_s.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("senet.train")
# metrics.jsonl key -> TensorBoard scalar tag
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_s": "train/images_per_s",
                    "data_wait_fraction": "train/data_wait_fraction", "crop_size": "train/crop_size",
                    "val_top1": "val/top1", "val_top5": "val/top5", "val_top1_ema": "val/top1_ema",
                    "val_top5_ema": "val/top5_ema", "write_s": "checkpoint/write_s"}
TENSORBOARD_FLUSH_S = 10  # a crashed run loses at most this much of its curves


class MetricsLog:
    """Appends rows to metrics.jsonl and TensorBoard; only the main rank writes (the others hold a disabled log)."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        self._tensorboard = tensorboard and enabled
        self._writer: Any = None
        self._purge_step: int | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # line-buffered by hand: a killed run loses at most the row in flight
            f.write(json.dumps(_finite(row)) + "\n")
        writer = self._board()
        if writer is not None and "step" in row:
            for key, tag in TENSORBOARD_TAGS.items():
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard writer (metrics.jsonl needs nothing)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _board(self) -> Any:
        """The TensorBoard writer, made at the first row (None without the tensorboard package)."""
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                log.info("no TensorBoard event files: the tensorboard package is not installed "
                         "(pip install 'senet[tensorboard]'); metrics.jsonl and curves.png are written")
                return None
            self._writer = SummaryWriter(str(self.path.parent), purge_step=self._purge_step,
                                         flush_secs=TENSORBOARD_FLUSH_S)
        return self._writer

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (and a torn last line); returns how many were dropped.

        TensorBoard's later steps of earlier sessions are purged by the next writer too.
        """
        self._purge_step = step + 1
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the row in flight when the run was killed
                dropped += 1
                continue
            if row.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl file (none yet when a run stopped before its first row)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: write them as strings so every line stays standard JSON."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def plot_curves(rows: Iterable[dict[str, Any]], out: str | Path) -> bool:
    """curves.png: training loss, learning rate and validation accuracy against the step.

    Returns False, with a one-line notice, when matplotlib is not installed (a GPU node's bare
    interpreter may lack it): the run itself needs nothing from it, and metrics.jsonl holds every row.
    """
    try:
        import matplotlib
    except ImportError:
        log.warning("no %s: matplotlib is not installed (pip install matplotlib); metrics.jsonl holds the same rows",
                    Path(out).name)
        return False
    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    rows = list(rows)
    train = [r for r in rows if "loss" in r and isinstance(r["loss"], (int, float))]
    val = [r for r in rows if "val_top1" in r]
    resumes = [r["step"] for r in rows if r.get("event") == "resume"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in val], [r["val_top1"] for r in val], "o-", label="top-1")
    axes[2].plot([r["step"] for r in val], [r["val_top5"] for r in val], "s-", label="top-5")
    ema = [r for r in val if "val_top1_ema" in r]
    if ema:
        axes[2].plot([r["step"] for r in ema], [r["val_top1_ema"] for r in ema], "^--", label="top-1, weight EMA")
    axes[2].set(title="validation accuracy", xlabel="step", ylim=(0, 1))
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
        for s in resumes:
            ax.axvline(s, color="gray", linestyle=":", linewidth=1)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True
