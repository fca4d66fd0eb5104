"""Parameters, multiply-adds and measured latency: the columns of arXiv:1709.01507, Table 2.

What :func:`count_macs` counts, precisely: the multiply-accumulates of every ``nn.Conv2d``
(``out_elements * in_channels / groups * kh * kw``) and every ``nn.Linear`` (``batch * in * out``),
including the two FC layers of each SE block, for one image. Bias additions, BatchNorm, ReLU,
sigmoid, pooling, concatenation, residual additions and the SE squeeze and scale are *not*
counted. This is the convention of the paper's "GFLOPs" column (conv + FC multiply-adds); it
reproduces every network of Table 2 within 0.4 % (measured: tests/test_models.py).

The paper's SE increments (+0.01 to +0.02 GFLOPs; "0.26 %" for SE-ResNet-50) are larger than the
SE FC layers alone (+0.0025 for SE-ResNet-50) and close to what the squeeze (one add per element)
and the scale (one multiply per element) add on top: ``se_elementwise=True`` counts those two
terms too (SE-ResNet-50: 3.8605 -> 3.8715, printed as 3.87 in Table 2).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.registry import create_model
from models.se import SqueezeExcitation

DEVICES = ("cpu", "gpu", "cuda")


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def _image_shape(input_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be a positive int or (height, width), got {input_size!r}")
    return size  # type: ignore[return-value]


def count_macs(
    model: nn.Module, input_size: int | tuple[int, int] = 224, *, se_elementwise: bool = False
) -> int:
    """Multiply-adds of one forward pass of one 3-channel image (see the module docstring).

    The forward pass runs on the meta device with the model's parameters swapped for meta
    tensors: only shapes are computed, so counting SENet-154 at 224 takes milliseconds and never
    touches the real weights, whatever device the model is on.

    Args:
        model: any module taking (N, 3, H, W) images.
        input_size: H = W, or (H, W).
        se_elementwise: also count each SE block's squeeze and scale, 2 x C x H x W (as Table 2 does).

    Returns:
        Multiply-accumulate count (divide by 1e9 for the paper's "GFLOPs").
    """
    height, width = _image_shape(input_size)
    total = 0

    def conv_hook(m: nn.Conv2d, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    def se_hook(m: SqueezeExcitation, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        nonlocal total
        total += 2 * inputs[0].numel()  # squeeze: one add per element; scale: one multiply per element

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SqueezeExcitation) and se_elementwise:
            handles.append(m.register_forward_hook(se_hook))
    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    was_training = model.training
    model.eval()  # eval: BN running stats are read, not updated (they are meta copies anyway)
    try:
        with torch.no_grad():
            functional_call(model, state, (torch.empty(1, 3, height, width, device="meta"),))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def _torch_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return torch.device("cuda")


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds of each call, ``repeats`` times, interleaved.

    Each repeat runs every call once, alternating the order, so that a slow drift of the machine
    (clock, thermal state, another process) hits all of them alike and their ratio stays fair.
    On GPU each call is timed between ``torch.cuda.synchronize()`` calls. ``clock`` is wall time by
    default; ``time.process_time`` measures this process's CPU time instead, which other
    processes' load hardly changes (use it with one torch thread: idle threads may spin).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(calls)
    for _ in range(warmup):  # allocator, kernel selection, caches
        for n in names:
            calls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            sync()
            start = clock()
            calls[n]()
            sync()
            times[n].append((clock() - start) * 1e3)
    return times


def measure_latency(
    models: dict[str, nn.Module],
    input_size: int | tuple[int, int] = 224,
    device: str = "cpu",
    repeats: int = 20,
    *,
    batch_size: int = 1,
    warmup: int = 3,
) -> dict[str, float]:
    """Median forward latency of each model, in milliseconds, measured interleaved.

    Models run in eval mode under ``torch.no_grad``, alternating model by model
    (:func:`time_interleaved`); models are moved to ``device`` in place.

    Args:
        models: name -> model.
        input_size: H = W, or (H, W).
        device: "cpu", or "gpu"/"cuda".
        repeats: timed calls per model (the median is reported).
        batch_size: images per call.
        warmup: untimed calls per model first.

    Returns:
        name -> median milliseconds per forward call.
    """
    dev = _torch_device(device)
    height, width = _image_shape(input_size)
    x = torch.randn(batch_size, 3, height, width, device=dev)
    for m in models.values():
        m.to(dev).eval()
    with torch.no_grad():
        calls = {n: (lambda m=m: m(x)) for n, m in models.items()}
        times = time_interleaved(calls, repeats, warmup, dev)
    return {n: statistics.median(t) for n, t in times.items()}


def complexity_report(
    name: str,
    baseline: str | None = None,
    input_size: int = 224,
    device: str = "cpu",
    repeats: int = 10,
    *,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Parameters, multiply-adds and latency of a registered model, optionally vs a baseline.

    Args:
        name: a registered model name.
        baseline: another registered name to compare against (e.g. "resnet50" for "se_resnet50").
        input_size: image side in pixels.
        device: where latency is measured: "cpu", or "gpu"/"cuda".
        repeats: timed forward calls per model (interleaved, median).
        batch_size: images per timed call.

    Returns:
        ``{"model": {"name", "params", "macs", "latency_ms"}, "baseline": {...} or None,
        "latency_ratio": model / baseline latency or None}``.
    """
    names = [name] if baseline is None else [name, baseline]
    models = {n: create_model(n) for n in names}
    latency = measure_latency(models, input_size, device, repeats, batch_size=batch_size)
    rows = {
        n: {"name": n, "params": count_params(m), "macs": count_macs(m, input_size), "latency_ms": latency[n]}
        for n, m in models.items()
    }
    return {
        "model": rows[name],
        "baseline": rows[baseline] if baseline is not None else None,
        "latency_ratio": latency[name] / latency[baseline] if baseline is not None else None,
    }


def format_table(report: dict[str, Any]) -> str:
    """A human table like the paper's Table 2: params (M), GFLOPs, latency (ms), ratio."""
    rows = [report["model"]] + ([report["baseline"]] if report["baseline"] else [])
    lines = [f"{'model':<22} {'params (M)':>10} {'GFLOPs':>8} {'latency (ms)':>13}"]
    for r in rows:
        lines.append(f"{r['name']:<22} {r['params'] / 1e6:>10.1f} {r['macs'] / 1e9:>8.2f} {r['latency_ms']:>13.1f}")
    if report["latency_ratio"] is not None:
        b, m = report["baseline"], report["model"]
        lines.append(
            f"{m['name']} / {b['name']}: latency x{report['latency_ratio']:.3f}, "
            f"params {m['params'] / b['params'] - 1:+.1%}, GFLOPs {m['macs'] / b['macs'] - 1:+.2%}"
        )
    return "\n".join(lines)
