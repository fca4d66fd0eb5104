"""`senet predict`: class scores for a folder of images, in file-name order, from a checkpoint.

Each process scores a contiguous shard of the files (the eval graph: short side to crop/ratio, centre
crop, or ten crops averaged) and writes its rows to a part file; rank 0 merges the parts after a
barrier, so every image is scored exactly once and lands in its own row whatever the world size.
Scores are softmax probabilities with devkit-ordered columns (column j = ILSVRC2012_ID j + 1).

Everything that shapes the numbers comes from the checkpoint's own config, as the training engine's
evaluation used it: the model's options, the eval input spec (`training.inputs.eval_input`: the test
resolution `data.eval_crop_size` and ratio, the batch dtype and layout, the decoder settings, the batch
size), the autocast precision (resolved for the device predict runs on) and the process settings
(`place_run` of the checkpoint's config on that device). So predict on a checkpoint scores exactly what
the engine measured on the same device. What predict may change is said explicitly: ten crops, another
test resolution (`crop_size`), another batch size, and which weights score: by default those the
checkpoint's `best_weights` names (the weight EMA when it won the validation), or `weights` = "raw"/"ema".
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.datasets import ImageIndex, list_images
from pipeline.devkit import Devkit
from pipeline.input_spec import EvalInput
from pipeline.errors import DataError
from training import dist as distmod
from training.checkpoint import CheckpointError, load_checkpoint
from training.build import build_model, configure_process
from training.config import Config, ConfigError, batch_layout, config_from_dict
from training.ema import checkpoint_weights
from training.inputs import eval_input
from training.placement import CONTROL_BACKEND, Placement, place_run
from training.precision import resolve_precision

log = logging.getLogger("senet.predict")
PARTS_TIMEOUT_S = 1800  # ranks wait this long for the slowest one to write its part


@dataclass(frozen=True)
class Scores:
    """Probabilities of every image (rows in file-name order, devkit-ID columns); `excluded` rows are fallbacks."""

    names: tuple[str, ...]
    probs: np.ndarray
    excluded: tuple[str, ...]
    weights: str = "raw"  # which weights scored: "raw" or "ema"
    crop_size: int = 0  # the test resolution used
    processes: int = 1


def checkpoint_config(state: dict, checkpoint: str | Path) -> Config:
    """The resolved config a checkpoint was trained with.

    Raises:
        CheckpointError: the saved config does not validate.
    """
    try:
        return config_from_dict(state["config"], f"{checkpoint} (saved config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(state: dict, cfg: Config, device: torch.device, checkpoint: str | Path,
               weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The checkpoint's model in eval mode on `device`, built from its own resolved config `cfg`, holding
    `weights` (a state dict of it: `training.ema.checkpoint_weights`; default its raw weights).

    Raises:
        CheckpointError: its weights do not fit the architecture it names.
    """
    model = build_model(replace(cfg, train=replace(cfg.train, device="gpu" if device.type == "cuda" else "cpu")), device)
    try:
        model.load_state_dict(state["model"] if weights is None else weights)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{checkpoint}: weights do not fit {state['arch']} with {state['num_classes']} classes "
                              f"({first})") from None
    return model.eval()


def devkit_columns(classes: list[str], devkit: Devkit, checkpoint: str | Path) -> np.ndarray:
    """Column of each model output in a devkit-ordered matrix: ILSVRC2012_ID - 1 of its WNID."""
    leaves = {s.wnid for s in devkit.leaves}
    unknown = [w for w in classes if w not in leaves]
    if unknown:
        raise CheckpointError(f"{checkpoint}: classes {unknown[:3]} are not in the devkit {devkit.path} "
                              "(was the model trained on this data set?)")
    return devkit.ilsvrc_ids(classes) - 1


def image_index(folder: str | Path) -> ImageIndex:
    """Every image of a flat folder, in ascending file-name order, unlabelled; or of a pack's split
    folder (PACK/test), in the order it was packed (the same)."""
    from pipeline.datasets import pack_index
    from pipeline.pack_reader import split_of

    packed = split_of(folder)
    if packed is not None:
        pack_dir, split = packed
        index = pack_index(pack_dir, split, strip=len(split) + 1)
        return ImageIndex(Path(folder), index.files, np.full(len(index), -1, dtype=np.int64), (), index.samples)
    names = list_images(folder)
    if not names:
        raise DataError(f"{folder}: no images (.JPEG/.jpg/.png) to predict")
    return ImageIndex(Path(folder), tuple(names), np.full(len(names), -1, dtype=np.int64), ())


def score_shard(model: torch.nn.Module, loader: Any, cfg: Config, place: Placement, columns: np.ndarray,
                num_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows: (positions into the images, devkit-ordered probabilities), as the engine evaluates.

    The probabilities stay on the device until the shard is done: a copy to the host per batch would make
    the host wait for the GPU at every batch (one rank's ImageNet-val shard is 50,000 / ranks x 1000 floats).
    """
    from training.engine import prepare_batch

    precision = resolve_precision(cfg.train.precision, place.device)
    layout = batch_layout(cfg, place.device)
    positions, rows = [], []
    with torch.no_grad():
        for batch, _labels, pos in loader:
            crops = batch.shape[1] if batch.dim() == 5 else 1
            flat = batch.reshape(-1, *batch.shape[-3:])
            images, _ = prepare_batch(flat, _labels, precision, layout)
            with precision.autocast():
                logits = model(images)
            rows.append(logits.float().softmax(dim=1).reshape(batch.shape[0], crops, -1).mean(dim=1))
            positions.append(pos.numpy())
    full = np.zeros((sum(len(p) for p in positions), num_columns), dtype=np.float32)
    if rows:
        full[:, columns] = torch.cat(rows).cpu().numpy()
    return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64), full


def predict_input(cfg: Config, device: str, *, batch_size: int | None = None, crop_size: int | None = None,
                  ten_crop: bool = False) -> tuple[EvalInput, Placement]:
    """This predict rank's eval spec and placement: the checkpoint's validation input and training placement
    (threads, Python workers, precision) on `device`, with predict's own batch size, test size and ten crops."""
    place = place_run(replace(cfg, train=replace(cfg.train, device=device)))
    return eval_input(cfg, place, batch_size=batch_size, crop_size=crop_size, ten_crop=ten_crop), place


def predict(checkpoint: str | Path, images: ImageIndex, devkit: Devkit, device: str, *, ten_crop: bool,
            batch_size: int | None, exclude: frozenset[str], parts: Path, crop_size: int | None = None,
            weights: str = "best") -> Scores | None:
    """Score `images` with the checkpoint over every rank of this job; the merged scores on rank 0, else None.

    Args:
        checkpoint: a checkpoint written by the training engine (or `senet import-weights`).
        images: the files to score (`image_index`), unlabelled.
        devkit: maps the checkpoint's classes (WNIDs) to ILSVRC2012_IDs.
        device: 'cpu' or 'gpu' (the rank facts come from the environment).
        ten_crop: average the four corners, the centre and their mirrors.
        batch_size: images per batch and rank; None = the checkpoint's train.batch_size (the engine's batches).
        exclude: file names on the exclusion list (they get the class prior, not a prediction).
        parts: a folder every rank can write its part file to (removed after the merge).
        crop_size: another test resolution; None = the checkpoint's (data.eval_crop_size, else data.crop_size).
        weights: "best" (the checkpoint's best_weights), "raw" or "ema".

    Raises:
        CheckpointError: unusable checkpoint, classes outside the devkit, or no EMA to score; DataError: a
            sharding fault.
    """
    from pipeline.loader import EvalLoader

    state = load_checkpoint(checkpoint, training=False)
    cfg = checkpoint_config(state, checkpoint)
    columns = devkit_columns(state["classes"], devkit, checkpoint)
    try:
        chosen, kind = checkpoint_weights(state, weights)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: --weights {weights}: {e}") from None
    spec, place = predict_input(cfg, device, batch_size=batch_size, crop_size=crop_size, ten_crop=ten_crop)
    # The engine's process settings: its threads (same kernels, same sums) and, on a GPU, cudnn's autotuning
    # (every batch but the last has one shape: the fastest kernels are found once).
    configure_process(place)
    # The loader first: its workers (if any) start before anything touches CUDA.
    loader = EvalLoader(images, spec, rank=place.dist.rank, world_size=place.dist.world_size, exclude=exclude)
    # Ranks only meet at a barrier here: a host (gloo) group whatever the device.
    owns_group = distmod.init_distributed(replace(place, backend=CONTROL_BACKEND), PARTS_TIMEOUT_S)
    try:
        with loader:
            model = load_model(state, cfg, place.torch_device, checkpoint, chosen)
            positions, probs = score_shard(model, loader, cfg, place, columns, devkit.num_classes)
        parts.mkdir(parents=True, exist_ok=True)
        np.savez(parts / f"rank{place.dist.rank:05d}.npz", positions=positions, probs=probs)
        distmod.barrier()
        if not place.is_main:
            return None
        scores = merge_parts(sorted(parts.glob("rank*.npz")), images, devkit.num_classes, exclude)
    finally:
        if owns_group:
            distmod.teardown_distributed()
    shutil.rmtree(parts, ignore_errors=True)
    return replace(scores, weights=kind, crop_size=spec.crop_size, processes=place.dist.world_size)


def merge_parts(parts: list[Path], images: ImageIndex, num_columns: int, exclude: frozenset[str]) -> Scores:
    """Rows of every rank's part file put back in file order; excluded images get the mean scores.

    Raises:
        DataError: an image scored twice or not at all (a sharding bug must never reach a submission).
    """
    probs = np.zeros((len(images), num_columns), dtype=np.float32)
    seen = np.zeros(len(images), dtype=np.int64)
    for part in parts:
        with np.load(part) as data:
            probs[data["positions"]] = data["probs"]
            np.add.at(seen, data["positions"], 1)
    excluded = np.array([f in exclude for f in images.files])
    if (seen[~excluded] != 1).any() or seen[excluded].any():
        bad = int(np.flatnonzero((seen != 1) & ~excluded)[0]) if ((seen != 1) & ~excluded).any() else -1
        raise DataError(f"internal: image {images.files[bad] if bad >= 0 else '?'} scored {seen[bad]} times")
    if excluded.any():
        # No honest prediction exists for an unreadable image; the mean distribution over the others is the
        # model's own class prior, so the line is the best guess without the pixels (and is valid).
        prior = probs[~excluded].mean(axis=0) if (~excluded).any() else np.full(num_columns, 1.0 / num_columns)
        probs[excluded] = prior
        for f in np.asarray(images.files)[excluded]:
            log.warning("%s is on the exclusion list: its line is the model's class prior, not a prediction",
                        images.root / f)
    return Scores(images.files, probs, tuple(np.asarray(images.files)[excluded].tolist()))
