"""`senet` commands for the challenge: predict, evaluate and ensemble."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.devkit import load_devkit, read_ground_truth
from senet.console import Failure, UsageError, add_exclusion_options, write_json
from training.submission import ensemble, load_scores, read_submission, score, top_ids, write_submission


def cmd_predict(args: argparse.Namespace) -> int:
    from training.checkpoint import CheckpointError

    if args.nproc < 1 or (args.batch_size is not None and args.batch_size < 1) or \
            (args.crop_size is not None and args.crop_size < 1):
        raise UsageError(f"--nproc {args.nproc}, --batch-size {args.batch_size} and --crop-size {args.crop_size} must "
                         f"be at least 1")
    in_job = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, our launcher, or a Slurm task
    try:
        if args.nproc > 1 and not in_job:
            from training.launch import launch_ranks

            return launch_ranks([sys.executable, "-m", "senet", *_predict_argv(args)], args.nproc)
        return predict_here(args)
    except CheckpointError as e:
        raise Failure(str(e)) from None


def _predict_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one predict rank."""
    argv = ["predict", args.checkpoint, args.images, "--devkit", args.devkit, "--out", args.out,
            "--device", args.device, "--cache-dir", args.cache_dir, "--weights", args.weights]
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size is not None else []
    argv += ["--crop-size", str(args.crop_size)] if args.crop_size is not None else []
    argv += ["--ten-crop"] * args.ten_crop + (["--scores", args.scores] if args.scores else [])
    return argv + (["--exclude", args.exclude] if args.exclude else [])


def predict_here(args: argparse.Namespace) -> int:
    """This process as one predict rank; rank 0 writes the submission (and the scores)."""
    import numpy as np

    from pipeline.datasets import load_exclusions, read_exclusions
    from training.predict import image_index, predict
    from training.submission import top_ids, write_submission

    kit = load_devkit(args.devkit)
    images = image_index(args.images)
    folder = Path(args.images)
    listed = load_exclusions(folder.resolve().parent, args.cache_dir) | read_exclusions(args.exclude)
    exclude = frozenset(n for n in images.files if n in listed or f"{folder.name}/{n}" in listed)
    # Each rank is placed as the checkpoint's training ranks were (its CPU share, threads, workers): N ranks
    # never start N all-core DALI pools.
    scores = predict(args.checkpoint, images, kit, args.device, ten_crop=args.ten_crop, batch_size=args.batch_size,
                     exclude=exclude, parts=Path(f"{args.out}.parts"), crop_size=args.crop_size, weights=args.weights)
    if scores is None:  # not rank 0
        return 0
    write_submission(args.out, top_ids(scores.probs))
    if args.scores:
        np.save(args.scores, scores.probs)
    crops = "ten-crop" if args.ten_crop else "single-crop"
    weights = "weight EMA" if scores.weights == "ema" else "raw weights"
    print(f"wrote {args.out}: {len(scores.names)} images ({crops} at {scores.crop_size} px, {weights}, "
          f"{scores.processes} process(es) on {args.device}), "
          f"{len(scores.excluded)} on the exclusion list given the class prior"
          + (f"; scores {args.scores} (images x {kit.num_classes}, column j = ILSVRC2012_ID j+1)" if args.scores else ""))
    return 0


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
    p = sub.add_parser("predict", help="ILSVRC submission file for a folder of images, from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint written by senet train (last.pt or best.pt)")
    p.add_argument("images", help="flat folder of images (e.g. ROOT/test); lines follow ascending file names")
    p.add_argument("--devkit", required=True, help="devkit folder (maps the model's classes to ILSVRC2012_IDs)")
    p.add_argument("--out", required=True, help="submission file to write")
    p.add_argument("--ten-crop", action="store_true", help="average 4 corner + centre crops and their mirrors")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch and process (default: the "
                   "checkpoint's train.batch_size, the batches its validation used)")
    p.add_argument("--crop-size", type=int, default=None, help="test resolution in pixels (default: the checkpoint's "
                   "data.eval_crop_size, else its final training size; the short side goes to crop/data.eval_crop_ratio)")
    p.add_argument("--weights", choices=("best", "raw", "ema"), default="best", help="which weights score: best = "
                   "those the checkpoint's best_weights names (its weight EMA when that won the validation), raw, or ema")
    p.add_argument("--nproc", type=int, default=1, help="local processes, each scoring a contiguous shard")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--scores", help="also save the probabilities (.npy, images x classes, devkit-ID columns)")
    add_exclusion_options(p)
    p.set_defaults(func=cmd_predict)

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
