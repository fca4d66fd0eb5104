"""`senet` commands for the challenge: evaluate and ensemble (predict joins them once a model is trained)."""
from __future__ import annotations

import argparse

from pipeline.devkit import load_devkit, read_ground_truth
from training.cli import UsageError, write_json
from training.submission import ensemble, load_scores, read_submission, score, top_ids, write_submission


def cmd_evaluate(args: argparse.Namespace) -> int:
    truth = read_ground_truth(args.ground_truth)
    num_classes = load_devkit(args.devkit).num_classes if args.devkit else int(truth.max())
    guesses = read_submission(args.predictions, num_classes=num_classes, num_images=len(truth))
    result = score(guesses, truth)
    write_json(args.json, result.as_dict())
    print(f"{args.predictions}: {result.images} images, top-1 error {result.top1_error:.4f}, "
          f"top-5 error {result.top5_error:.4f}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    kit = load_devkit(args.devkit)
    mats = load_scores(args.scores, kit.num_classes)
    try:
        mean = ensemble(mats, args.weights)
    except ValueError as e:
        raise UsageError(str(e)) from None
    write_submission(args.out, top_ids(mean))
    if args.save_scores:
        import numpy as np

        np.save(args.save_scores, mean.astype(np.float32))
    print(f"wrote {args.out}: {mean.shape[0]} images, average of {len(mats)} models"
          + (f" with weights {args.weights}" if args.weights else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `senet` parser."""
    p = sub.add_parser("evaluate", help="top-1 / top-5 error of a submission file, as the challenge scores it")
    p.add_argument("predictions", help="submission file: one line per image, up to 5 ILSVRC2012_IDs")
    p.add_argument("--ground-truth", required=True, help="one ILSVRC2012_ID per line (e.g. the devkit's val ground truth)")
    p.add_argument("--devkit", help="devkit folder: IDs must lie in 1..its class count (else 1..max of the ground truth)")
    p.add_argument("--json", help="write {top1_error, top5_error, images} here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ensemble", help="average the score matrices of several models into a submission file")
    p.add_argument("scores", nargs="+", help="score matrices from `senet predict --scores` (.npy, devkit-ID columns)")
    p.add_argument("--devkit", required=True, help="devkit folder")
    p.add_argument("--out", required=True, help="submission file to write")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per score file (default: equal)")
    p.add_argument("--save-scores", help="also save the averaged matrix (.npy)")
    p.set_defaults(func=cmd_ensemble)
