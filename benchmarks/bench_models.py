"""What does SE cost? SE-ResNet-50 / ResNet-50 time ratios, forward and training step.

The paper's slides report SE at +10 % GPU training time and < 2 % CPU inference time; the goal
here is a forward ratio <= 1.05 on CPU. Both nets are the released Caffe layout (stride on the
first 1x1), built by ``models.create_model``. Timings are interleaved (each repeat runs every
variant once, alternating the order), so machine drift hits all alike; the table gives medians,
minima and the median of per-repeat paired ratios (the robust one on a shared machine).

Variants: the SE block as shipped (at inference the squeeze is read from the 4x narrower conv3
input, and the scale is fused into the residual addition with ``addcmul``), the same weights in
the textbook block (pools the full branch, then ``branch * gate + identity`` in two passes), and
both nets in channels-last memory format. On GPU everything runs under bf16 autocast, channels-last.

On a shared machine wall times swing with other processes' load (printed at start and end);
``--threads 1 --clock cpu`` times this process's CPU time instead, which that load hardly moves.

Usage::

    python benchmarks/bench_models.py                      # CPU (2 threads), batch 8 at 224
    python benchmarks/bench_models.py --threads 1 --clock cpu   # CPU time, robust to other load
    python benchmarks/bench_models.py --device cuda --batch-size 128
    python benchmarks/bench_models.py --json results.json

Measures and prints; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models import create_model  # noqa: E402
from models.blocks import Bottleneck  # noqa: E402
from models.complexity import time_interleaved  # noqa: E402


def textbook_forward(self: Bottleneck, x: Tensor) -> Tensor:
    """The textbook SE-ResNet block: pool the branch, scale (one pass), add (another); comparison only."""
    identity = x if self.shortcut is None else self.shortcut(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    out = out * self.se(out) + identity
    return self.relu(out)


def textbook(model: nn.Module) -> nn.Module:
    """Swap every SE block's forward for :func:`textbook_forward` (instance attribute, weights kept)."""
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.se is not None:
            m.forward = types.MethodType(textbook_forward, m)  # type: ignore[method-assign]
    return model


def variants(gpu: bool) -> dict[str, Callable[[], nn.Module]]:
    """name -> builder of each timed model (GPU: channels-last only; fp32 NCHW is not how GPUs run)."""
    out: dict[str, Callable[[], nn.Module]] = {}
    if not gpu:
        out |= {"resnet50": lambda: create_model("resnet50"), "se_resnet50": lambda: create_model("se_resnet50")}
    out |= {
        "resnet50 channels_last": lambda: create_model("resnet50", channels_last=True),
        "se_resnet50 channels_last": lambda: create_model("se_resnet50", channels_last=True),
        "se_resnet50 textbook channels_last": lambda: textbook(create_model("se_resnet50", channels_last=True)),
    }
    return out


def forward_calls(models: dict[str, nn.Module], x: Tensor, bf16: bool) -> dict[str, Callable[[], object]]:
    """name -> one inference forward (eval, no_grad, optional bf16 autocast)."""

    def call(model: nn.Module) -> None:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    for m in models.values():
        m.to(x.device).eval()
    return {n: (lambda m=m: call(m)) for n, m in models.items()}


def train_calls(models: dict[str, nn.Module], x: Tensor, bf16: bool) -> dict[str, Callable[[], object]]:
    """name -> one SGD step (forward, loss, backward, update), optional bf16 autocast."""
    y = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    calls = {}
    for n, m in models.items():
        m.to(x.device).train()
        calls[n] = (lambda m=m, o=torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9): step(m, o))
    return calls


def machine(device: torch.device) -> str:
    """CPU model (as lscpu names it) and thread count, or the GPU name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def baseline_of(name: str) -> str:
    """The plain ResNet-50 in the same memory format."""
    return "resnet50 channels_last" if "channels_last" in name else "resnet50"


def ratios(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Three estimates of each model's time / its baseline's.

    ``medians`` and ``mins`` compare the two distributions; ``paired`` is the median over repeats
    of (this repeat's time / the baseline's time in the same repeat). The paired estimate is the
    one to trust on a shared machine: the two calls of a repeat run back to back, under the same load.
    """
    out = {}
    for n, t in times.items():
        base = times[baseline_of(n)]
        out[n] = {
            "medians": statistics.median(t) / statistics.median(base),
            "mins": min(t) / min(base),
            "paired": statistics.median(a / b for a, b in zip(t, base)),
        }
    return out


def table(title: str, times: dict[str, list[float]]) -> str:
    """Markdown table: median and min ms per call, and the ratios of :func:`ratios`."""
    lines = [
        f"**{title}**",
        "",
        "| model | median ms | min ms | ratio of medians | ratio of mins | paired ratio (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, r in ratios(times).items():
        t = times[n]
        ratio_cells = [f"{r[k]:.3f}" for k in ("medians", "mins", "paired")]
        cells = [f"{statistics.median(t):.1f}", f"{min(t):.1f}", *ratio_cells]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (this sandbox: 2 cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per model (CPU 15, GPU 50)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed steps per model (CPU 5, GPU 30)")
    parser.add_argument("--no-train", action="store_true", help="forward latency only")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: this process's CPU time, nearly immune to other processes on a shared machine (use --threads 1)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch_size or (128 if gpu else 8)
    repeats = args.repeats or (50 if gpu else 15)
    train_repeats = args.train_repeats or (30 if gpu else 5)
    torch.manual_seed(0)
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    if gpu and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time, not GPU work; use --clock wall with --device cuda")
    result: dict[str, Any] = {
        "machine": machine(device), "device": device.type, "batch_size": batch, "input_size": args.input_size,
        "clock": args.clock, "torch": torch.__version__,
    }  # fmt: skip
    print(f"# SE cost on {result['machine']} (torch {torch.__version__}), batch {batch} at {args.input_size}, "
          f"{args.clock} clock; load average {os.getloadavg()[0]:.1f} at start")
    # bf16 autocast on GPU; fp32 on CPU (this sandbox's CPU lists no AMX or AVX512-BF16 in lscpu).
    models = {n: build() for n, build in variants(gpu).items()}
    x = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    forward = time_interleaved(forward_calls(models, x, bf16=gpu), repeats, 3, device, clock)
    result["forward_ms"], result["forward_ratios"] = forward, ratios(forward)
    precision = "bf16 autocast" if gpu else "fp32"
    print(table(f"forward (eval, no_grad, {precision}), {repeats} interleaved repeats", forward), "\n")

    if not args.no_train:
        # Channels-last, fused SE only: the layout and block that the forward table shows faster.
        train_models = {n: m for n, m in models.items() if n.endswith("channels_last") and "textbook" not in n}
        train = time_interleaved(train_calls(train_models, x, bf16=gpu), train_repeats, 2, device, clock)
        result["train_step_ms"], result["train_step_ratios"] = train, ratios(train)
        print(table(f"training step (SGD, {precision}), {train_repeats} interleaved repeats", train))
    result["load_average_end"] = os.getloadavg()[0]  # other processes on a shared machine skew wall times
    print(f"\nload average {result['load_average_end']:.1f} at end")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
