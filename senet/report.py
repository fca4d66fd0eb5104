"""`senet report DEMO_DIR`: the one-minute read of what `make demo` ran, with its numbers and plots.

It only reads what the demo's steps wrote (check-data's JSON, the run folders, bench-input's JSON,
the submission and its score) and draws the class histogram of the source against what the
class-aware sampler delivers; nothing is measured or invented here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import index_train, load_exclusions
from pipeline.sampling import ClassAwareSampler
from training.metrics import read_metrics


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _val_rows(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "val_top1" in r] if (run / "metrics.jsonl").is_file() else []


def class_histogram(root: Path, cache_dir: Path, out: Path, seed: int = 0) -> dict[str, list[int]]:
    """Plot images per class in the source against one epoch of the class-aware sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = index_train(root, cache_dir).without(load_exclusions(root, cache_dir))
    source = index.class_counts()
    order = np.fromiter(ClassAwareSampler(index.labels, seed=seed), dtype=np.int64)
    delivered = np.bincount(index.labels[order], minlength=len(index.classes))
    x = np.arange(len(index.classes))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(x - 0.2, source, width=0.4, label="images in the source (long tail)")
    ax.bar(x + 0.2, delivered, width=0.4, label="samples delivered in one epoch (class-aware)")
    ax.set_xticks(x, [f"{i}" for i in x])
    ax.set_xlabel("class index (sorted WNID)")
    ax.set_ylabel("count")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Class-aware (Relay-BP) sampling flattens the long tail")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"source": source.tolist(), "delivered": delivered.tolist()}


def write_report(demo: Path) -> Path:
    """Write DEMO/REPORT.md from the demo's outputs; returns its path."""
    check = _json(demo / "check.json") or {}
    bench = _json(demo / "bench.json") or {}
    val_score = _json(demo / "val_score.json") or {}
    slurm = _json(demo / "slurm.json") or {}
    local_rows = _val_rows(demo / "run")
    local = local_rows[-1] if local_rows else None
    best = max(local_rows, key=lambda r: r["val_top1"]) if local_rows else None  # the epoch best.pt holds
    remote_rows = _val_rows(Path(slurm["run_dir"])) if slurm.get("run_dir") else []
    remote = remote_rows[-1] if remote_rows else None
    hist = class_histogram(demo / "data", demo / "cache", demo / "class_histogram.png")

    train = check.get("splits", {}).get("train", {})
    lines = ["# senet demo report", "",
             "Everything below was produced by `make demo` on this machine, CPU only, from synthetic data in "
             "the exact ILSVRC2012 layout.", ""]
    lines += ["## 1. Data and pre-flight check", "",
              f"- {train.get('images', '?')} training images in {train.get('classes', '?')} classes, "
              f"{train.get('min_per_class', '?')} to {train.get('max_per_class', '?')} per class "
              f"(imbalance {train.get('imbalance', 0):.1f}x); "
              + ", ".join(f"{v['images']} {k}" for k, v in check.get("splits", {}).items() if k != "train"),
              f"- odd but valid (loaded normally): {', '.join(o['kind'] for o in check.get('odd', [])) or 'none'}",
              f"- undecodable, excluded from training: {len(check.get('undecodable', []))} "
              f"({', '.join(b['path'] for b in check.get('undecodable', []))})",
              f"- class histogram, source vs one epoch of the sampler: source {hist['source']}, delivered "
              f"{hist['delivered']}", "", "![class histogram](class_histogram.png)", "",
              "![augmented samples](augment.png)", ""]
    lines += ["## 2. Training (2 local processes, gloo, class-aware sampling, full augmentation)", ""]
    if local:
        lines += [f"- `se_resnext_tiny`, {local['epoch'] + 1} epochs: val top-1 **{local['val_top1']:.3f}**, "
                  f"top-5 **{local['val_top5']:.3f}** ({local.get('val_images', '?')} images; chance "
                  f"{1 / max(1, train.get('classes', 1)):.3f})", "", "![learning curves](run/curves.png)", ""]
    lines += ["## 3. ILSVRC submission", ""]
    if val_score and best:
        lines += [f"- `senet predict` (best.pt) on val + `senet evaluate` (the challenge's scoring): top-1 error "
                  f"{val_score['top1_error']:.4f}, top-5 error {val_score['top5_error']:.4f} over "
                  f"{val_score['images']} images; the engine measured top-1 {best['val_top1']:.4f}, top-5 "
                  f"{best['val_top5']:.4f} in that epoch, i.e. errors {1 - best['val_top1']:.4f} / "
                  f"{1 - best['val_top5']:.4f}"]
    sub = demo / "submission.txt"
    if sub.is_file():
        lines += [f"- test-set submission: `submission.txt`, {len(sub.read_text().splitlines())} lines, "
                  "up to 5 ILSVRC2012_IDs each, most confident first", ""]
    lines += ["## 4. Input throughput (DALI vs PyTorch DataLoader + PIL, same cores)", ""]
    if bench:
        stages = bench.get("stages", {})
        lines += ["| stage | images/s |", "| --- | ---: |"] + [f"| {k} | {v:.0f} |" for k, v in stages.items()]
        base = bench.get("baseline", {}).get("full")
        if base:
            lines += [f"| baseline (DataLoader + PIL, full augmentation) | {base:.0f} |", "",
                      f"full DALI / baseline = **{stages.get('full', 0) / base:.2f}x**; full / crop_flip = "
                      f"**{stages.get('full', 0) / max(1e-9, stages.get('crop_flip', 0)):.2f}x** "
                      f"({bench.get('threads')} threads, batch {bench.get('batch_size')}; a short demo run on a "
                      "busy machine: see benchmarks/ for the measured tables)"]
        lines += ["", "![input throughput](bench.png)", ""]
    lines += ["## 5. The same training as a Slurm job, preempted mid-run (local cluster: 2 nodes x 1 task)", ""]
    resume = _json(demo / "resume.json") or {}
    if resume:
        verdict = ("**bit-identical** to" if resume.get("identical") else "**different** from")
        lines += [f"- job {resume['job_id']} (`{resume['run_dir']}`), the local run's config and world size: preempted "
                  f"at step {resume['preempted_at']} by a job in the `urgent` partition, requeued "
                  f"{resume['requeues']} time(s) ({' -> '.join(resume['states'])}), resumed from its checkpoint at "
                  f"step {', '.join(map(str, resume['resumed_at'])) or '-'}",
                  f"- its final parameters (step {resume['steps']['slurm']}) are {verdict} the local run's "
                  f"(sha256 {resume['digests']['slurm'][:16]}... and {resume['digests']['local'][:16]}...)"]
    elif slurm:
        lines += [f"- job {slurm.get('job_id')}, run folder `{slurm.get('run_dir')}` (did not finish: no resume.json)"]
    if remote:
        lines += [f"- val top-1 {remote['val_top1']:.3f}, top-5 {remote['val_top5']:.3f} after {remote['epoch'] + 1} "
                  "epochs"]
    lines += ["", "Curves in TensorBoard: `tensorboard --logdir demo` (each run folder is a run).", ""]
    path = demo / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
