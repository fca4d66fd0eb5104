"""`senet complexity` (parameters, multiply-adds and measured latency against a baseline) and `senet
import-weights` (published SENet weights as a senet checkpoint)."""
from __future__ import annotations

import argparse
from pathlib import Path

from senet.console import Failure, UsageError, write_json


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


def cmd_import_weights(args: argparse.Namespace) -> int:
    from models.published import ConversionError
    from training.checkpoint import CheckpointError
    from training.weights import import_weights

    classes = class_list(args.devkit, args.classes)
    try:
        done = import_weights(args.source, args.arch, args.out, classes, source=args.source_kind)
    except ConversionError as e:
        raise UsageError(str(e)) from None
    except CheckpointError as e:
        raise Failure(str(e)) from None
    print(f"wrote {done['out']}: {done['arch']} ({args.source_kind} {done['source']}), {done['num_classes']} classes, "
          f"{done['keys']} tensors converted; score it with `senet predict {done['out']} VAL --devkit DIR`, or start "
          f"a run from it with --set train.init_from={done['out']}")
    return 0


def class_list(devkit: str | None, classes: str | None) -> list[str]:
    """The WNIDs of the network's outputs: the devkit's leaves in sorted-WNID order (what these sources were
    trained on, as folder readers number classes), or a file of WNIDs in output order."""
    if bool(devkit) == bool(classes):
        raise UsageError("give the class list with --devkit DIR (ILSVRC2012's, sorted WNIDs) or --classes FILE "
                         "(one WNID per line, in output order)")
    if devkit:
        from pipeline.devkit import load_devkit

        return sorted(s.wnid for s in load_devkit(devkit).leaves)
    try:
        wnids = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"--classes {classes}: cannot read it ({e.strerror})") from None
    if len(set(wnids)) != len(wnids):
        raise UsageError(f"--classes {classes}: a WNID appears twice")
    return wnids


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

    p = sub.add_parser("import-weights", help="a published SENet state dict (pretrainedmodels, timm legacy_*) as a "
                       "senet checkpoint")
    p.add_argument("source", help="the downloaded .pth file (nothing is fetched)")
    p.add_argument("--arch", required=True, help="the network: se_resnet50/101/152, se_resnext50_32x4d, "
                   "se_resnext101_32x4d, senet154 (or the source's own name, e.g. legacy_seresnet50)")
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument("--from", dest="source_kind", choices=("pretrainedmodels", "timm"), default="pretrainedmodels",
                   help="where the weights come from (timm: its legacy_* ports, the same networks)")
    p.add_argument("--devkit", help="ILSVRC2012 devkit: its 1000 WNIDs, sorted, are the outputs' classes")
    p.add_argument("--classes", help="or a file of WNIDs, one per line, in output order")
    p.set_defaults(func=cmd_import_weights)
