"""Mixed precision as one code path: autocast and GradScaler that do nothing when switched off.

bf16 is the default on GPU (same exponent range as fp32: no loss scaling needed); fp16 needs a
GradScaler; fp32 is the default on CPU, where autocast rarely pays.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast's device type and dtype, and whether loss scaling is on."""

    name: str  # fp32, bf16 or fp16
    device_type: str  # "cuda" or "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def enabled(self) -> bool:
        """Autocast on (False for fp32: autocast then does nothing)."""
        return self.name != "fp32"

    @property
    def scaled(self) -> bool:
        """Loss scaling on: fp16 only (bf16 has fp32's range)."""
        return self.name == "fp16"

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is a pass-through unless fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def resolve_precision(name: str, device: str) -> Precision:
    """`train.precision` ("auto", "fp32", "bf16", "fp16") for a device ("cpu" or "gpu").

    Raises:
        ValueError: an unknown name, naming the accepted ones.
    """
    if name == "auto":
        name = "bf16" if device == "gpu" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; use 'auto', 'fp32', 'bf16' or 'fp16'")
    return Precision(name, "cuda" if device == "gpu" else "cpu")
