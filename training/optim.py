"""SGD as in the SENet paper and its per-step learning-rate schedule.

Recipe (the SENet paper and its ILSVRC 2017 slides): momentum 0.9, weight decay 1e-4, LR 0.6 at batch 1024 scaled linearly to the
global batch, divided by 10 every 30 epochs; optional linear warmup (large batches, Goyal et al. 2017),
optional cosine or linear-to-zero decay instead of steps. The LR is a pure function of the optimizer
step, so a resumed run needs only how far it got: its state says it in samples (steps x global batch),
which mean the same on any number of processes; a run's global batch is fixed when it starts
(training.virtual), so they map back to the same step.

Fused SGD: NVIDIA apex's `apex.optimizers.FusedSGD` when the real apex is importable, else
`torch.optim.SGD(fused=True)` on GPU, else the plain (foreach) implementation. PyPI hosts an unrelated
package also called `apex` (a Pyramid web toolkit); `import apex` then succeeds but has no optimizers,
and we say so instead of failing obscurely.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import math
from typing import Any

import torch
from torch import nn

from training.config import ConfigError, OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_bn_and_bias: bool) -> list[dict[str, Any]]:
    """One group with weight decay; a second without it for BN parameters and biases, when asked.

    Parameters of 1 dimension (BN gammas and betas, biases) are the no-decay set: the usual rule,
    which catches every normalisation layer without listing their types.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_bn_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def real_apex_fused_sgd() -> tuple[type | None, str]:
    """NVIDIA apex's FusedSGD class, or None and why it is not available."""
    try:
        apex = importlib.import_module("apex")
    except ImportError:
        return None, "NVIDIA apex is not installed"
    try:
        return importlib.import_module("apex.optimizers").FusedSGD, "NVIDIA apex FusedSGD"
    except (ImportError, AttributeError) as e:
        try:
            summary = importlib.metadata.metadata("apex").get("Summary", "") or ""
        except importlib.metadata.PackageNotFoundError:
            summary = ""
        if "nvidia" not in summary.lower() and (summary or not hasattr(apex, "amp")):
            return None, (f"the installed 'apex' ({getattr(apex, '__file__', '?')}) is the unrelated PyPI package "
                          f"{summary!r}, not NVIDIA apex; `pip uninstall apex` and build NVIDIA's from source")
        return None, f"NVIDIA apex is installed without its CUDA extensions ({e})"


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: str) -> tuple[torch.optim.Optimizer, str]:
    """SGD over the model's parameters; the LR is set per step by `LRSchedule`.

    Args:
        model: the unwrapped model.
        cfg: the `optim` section.
        device: "cpu" or "gpu".

    Returns:
        The optimizer and the implementation chosen ("apex FusedSGD", "torch fused", "torch foreach").

    Raises:
        ConfigError: `optim.fused` asks for an implementation that this machine cannot provide.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_bn_and_bias)
    kwargs = dict(lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("optim.nesterov = true needs optim.momentum > 0")
    fused_sgd, why = real_apex_fused_sgd()
    choice = cfg.fused
    if choice == "apex" and (fused_sgd is None or device != "gpu"):
        reason = why if fused_sgd is None else "FusedSGD runs on CUDA only and train.device is 'cpu'"
        raise ConfigError(f"optim.fused = 'apex' but {reason}; use optim.fused=auto, torch or none")
    if choice == "torch" and device != "gpu":
        raise ConfigError("optim.fused = 'torch' needs train.device = 'gpu' (torch's fused SGD is CUDA-only here); "
                          "use optim.fused=auto or none")
    if choice == "auto":
        choice = "apex" if (fused_sgd is not None and device == "gpu") else ("torch" if device == "gpu" else "none")
    if choice == "apex":
        return fused_sgd(groups, **kwargs), "apex FusedSGD"
    if choice == "torch":
        return torch.optim.SGD(groups, fused=True, **kwargs), "torch fused"
    return torch.optim.SGD(groups, foreach=True, **kwargs), "torch foreach"


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak LR: `optim.lr` at `optim.reference_batch`, scaled linearly (Goyal et al. 2017)."""
    return cfg.lr * global_batch / cfg.reference_batch


class LRSchedule:
    """The learning rate of every optimizer step: warmup, then step decay, cosine or linear to zero.

    Args:
        cfg: the `optim` section.
        global_batch: images per step over all ranks.
        steps_per_epoch: optimizer steps in one epoch.
        epochs: length of the run (cosine and linear decay to 0 at its end).
    """

    def __init__(self, cfg: OptimConfig, global_batch: int, steps_per_epoch: int, epochs: int) -> None:
        self.global_batch = global_batch
        self.peak = scaled_lr(cfg, global_batch)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self.kind, self.step_epochs, self.gamma = cfg.schedule, cfg.step_epochs, cfg.gamma
        self.step_count = 0  # optimizer steps taken

    def lr(self, step: int) -> float:
        """LR used by optimizer step `step` (0-based)."""
        if step < self.warmup_steps:  # linear from peak/warmup_steps up to the peak: step 0 already moves
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)  # share of the decay behind us
        if self.kind == "cosine":
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * done))
        if self.kind == "linear":  # FFCV's ImageNet schedule after its peak: straight down to zero at the end
            return self.peak * (1.0 - done)
        return self.peak * self.gamma ** (step // self.steps_per_epoch // self.step_epochs)

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the LR for the next optimizer step; returns it."""
        lr = self.lr(self.step_count)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Count one optimizer step (called after `optimizer.step()`)."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """How far the schedule got, in samples (`samples`, `global_batch`), and what it was for the record."""
        return {"samples": self.step_count * self.global_batch, "global_batch": self.global_batch,
                "step_count": self.step_count, "peak": self.peak, "steps_per_epoch": self.steps_per_epoch,
                "warmup_steps": self.warmup_steps, "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the samples `state` has seen (its step count, in a state older than samples).

        Raises:
            ValueError: those samples are not whole steps of this schedule's global batch.
        """
        if "samples" not in state:
            self.step_count = int(state["step_count"])
            return
        samples = int(state["samples"])
        if samples % self.global_batch:
            raise ValueError(f"the schedule saw {samples} samples (global batch {state.get('global_batch')}), not whole "
                             f"steps of this run's global batch {self.global_batch}")
        self.step_count = samples // self.global_batch
