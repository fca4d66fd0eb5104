"""`senet complexity`: parameters, multiply-adds and measured latency of a model against a baseline."""
from __future__ import annotations

import argparse

from senet.cli import Failure, UsageError, write_json


def cmd_complexity(args: argparse.Namespace) -> int:
    from models import list_models
    from models.complexity import complexity_report, format_table

    for name in filter(None, (args.arch, args.baseline)):
        if name not in list_models():
            raise UsageError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    try:
        report = complexity_report(args.arch, args.baseline, input_size=args.input_size, device=args.device,
                                   repeats=args.repeats, batch_size=args.batch_size)
    except RuntimeError as e:  # e.g. --device gpu on a machine without CUDA
        raise Failure(str(e)) from None
    write_json(args.json, report)
    print(f"input {args.input_size}x{args.input_size}, batch {args.batch_size}, device {args.device}, "
          f"median of {args.repeats} interleaved runs; GFLOPs = multiply-adds of conv and fc layers")
    print(format_table(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `senet` parser."""
    p = sub.add_parser("complexity", help="parameters, multiply-adds and forward latency vs a baseline")
    p.add_argument("arch", help="registered model name, e.g. se_resnet50")
    p.add_argument("--baseline", help="model to compare with, e.g. resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed forward calls per model (interleaved)")
    p.add_argument("--json", help="write {model, baseline, latency_ratio} here")
    p.set_defaults(func=cmd_complexity)
