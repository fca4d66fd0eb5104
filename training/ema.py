"""Weight EMA: an exponential moving average of the parameters, kept beside the model, validated beside the raw
weights, checkpointed and resumed exactly.

Definition, per optimizer step t whatever `train.ema_every`: ema_t = d * ema_(t-1) + (1 - d) * w_t, with d =
`train.ema_decay`: an average over about 1 / (1 - d) steps. Applied every k = `train.ema_every` steps (after
the steps whose count is a multiple of k) as ema <- d**k * ema + (1 - d**k) * w: the same horizon for a
k-th of the work; with k = 1 it is the definition itself, with k > 1 the average of every k-th weight
(timm's ModelEmaV3 and Composer's EMA thin their updates the same way).

No warm-up: the average starts at the run's initial weights (train.init_from's, when given) and
forgets them as d**t. With d = 0.9998 the start weighs e^-1 after 5,000 steps, so a run much shorter
than 1 / (1 - d) steps mostly averages its initialisation; `build` warns when that is the case.

Kept in fp32 on the model's device, whatever the autocast precision. Only the parameters are averaged:
BatchNorm's running statistics (buffers) are taken from the model when the EMA is evaluated or
written out, so the EMA is scored with rank 0's statistics, which the engine broadcasts before each
validation, as the raw weights are. In a checkpoint the EMA is one entry, "ema" (`WeightEMA.state_dict`);
`best_weights` there says whether "raw" or "ema" weights scored the best validation, and
`checkpoint_weights` gives either as a model state dict (what `senet predict --weights` and
`train.init_from` load).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger("senet.train")
WEIGHTS = ("raw", "ema")  # what a checkpoint's best_weights and predict's --weights name


class WeightEMA:
    """The EMA of `model`'s parameters (see the module docstring).

    Args:
        model: the unwrapped model (its parameters are read at each update, overwritten only inside `applied`).
        decay: d per optimizer step, in [0, 1).
        every: apply every this many optimizer steps, with d**every.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        if not 0 <= decay < 1 or every < 1:
            raise ValueError(f"EMA decay {decay} must lie in [0, 1) and every {every} be >= 1")
        self.decay, self.every = decay, every
        self.names = [name for name, _ in model.named_parameters()]
        self._params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self._params]
        self.updates = 0  # optimizer steps averaged in (counted with `every` per update)

    def reset(self, model: nn.Module) -> None:
        """Start the average afresh at the model's current weights (after train.init_from loaded them)."""
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [p.detach().float() for _, p in model.named_parameters()])
        self.updates = 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (counted from 1) when `every` divides it."""
        if step % self.every:
            return
        kept = self.decay ** self.every
        weights = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self._params]
        torch._foreach_mul_(self.shadow, kept)
        torch._foreach_add_(self.shadow, weights, alpha=1.0 - kept)
        self.updates += self.every

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the EMA's parameters (and its own buffers) inside the block; its own weights after it,
        bit for bit."""
        params = [p for _, p in model.named_parameters()]
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (a checkpoint's "ema" entry): decay, every, updates and the fp32 parameters."""
        return {"decay": self.decay, "every": self.every, "updates": self.updates,
                "params": {name: t for name, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the average saved in `state` (the names must match the model's parameters)."""
        params = state["params"]
        if sorted(params) != sorted(self.names):
            missing = sorted(set(self.names) - set(params))[:3]
            raise ValueError(f"the saved EMA does not fit this model (missing {missing})")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow):
                shadow.copy_(params[name])
        self.updates = int(state.get("updates", 0))


def checkpoint_weights(state: dict[str, Any], which: str = "best") -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's model state dict as `which` weights: "raw", "ema" (the EMA's parameters with the model's
    buffers) or "best" (those its `best_weights` names; raw when it has none). Returns it and the kind used.

    Raises:
        ValueError: "ema" asked of a checkpoint without an EMA, or an unknown kind.
    """
    if which == "best":
        which = state.get("best_weights", "raw")
    if which not in WEIGHTS:
        raise ValueError(f"weights {which!r}: use one of 'best', {', '.join(map(repr, WEIGHTS))}")
    if which == "raw":
        return state["model"], "raw"
    ema = state.get("ema")
    if not ema:
        raise ValueError("it holds no EMA weights (the run had train.ema_decay = null); use the raw weights")
    weights = dict(state["model"])
    for name, tensor in ema["params"].items():
        weights[name] = tensor.to(weights[name].dtype)
    return weights, "ema"


def ema_horizon_note(decay: float, total_steps: int) -> str | None:
    """A warning when the run is shorter than the EMA's horizon (1 / (1 - decay) steps), else None."""
    horizon = 1.0 / (1.0 - decay)
    if total_steps >= horizon:
        return None
    return (f"train.ema_decay = {decay:g} averages over about {horizon:,.0f} steps, more than this run's "
            f"{total_steps:,} steps: the EMA will still weigh the initial weights by {decay ** total_steps:.0%} at the "
            f"end (no warm-up); a smaller decay, e.g. {1 - 10 / max(total_steps, 10):.4g}, fits this run")
