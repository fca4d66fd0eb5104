"""`senet predict`: class scores for a folder of images, in file-name order, from a checkpoint.

Each process scores a contiguous shard of the files (the eval graph: short side to crop/ratio, centre
crop, or ten crops averaged) and writes its rows to a part file; rank 0 merges the parts after a
barrier, so every image is scored exactly once and lands in its own row whatever the world size.
Scores are softmax probabilities with devkit-ordered columns (column j = ILSVRC2012_ID j + 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import ImageIndex, list_images
from pipeline.devkit import Devkit
from pipeline.errors import DataError
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import ConfigError, config_from_dict
from training.dist import DistInfo

log = logging.getLogger("senet.predict")


@dataclass(frozen=True)
class Scores:
    """Probabilities of every image (rows in file-name order, devkit-ID columns); `excluded` rows are fallbacks."""

    names: tuple[str, ...]
    probs: np.ndarray
    excluded: tuple[str, ...]


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model in eval mode, rebuilt from the checkpoint's own resolved config.

    Raises:
        CheckpointError: unreadable, or its weights do not fit the architecture it names.
    """
    from training.engine import build_model

    state = load_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(state["config"], f"{checkpoint} (saved config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{checkpoint}: weights do not fit {state['arch']} with {state['num_classes']} classes "
                              f"({first})") from None
    return model.eval(), state


def devkit_columns(classes: list[str], devkit: Devkit, checkpoint: str | Path) -> np.ndarray:
    """Column of each model output in a devkit-ordered matrix: ILSVRC2012_ID - 1 of its WNID."""
    leaves = {s.wnid for s in devkit.leaves}
    unknown = [w for w in classes if w not in leaves]
    if unknown:
        raise CheckpointError(f"{checkpoint}: classes {unknown[:3]} are not in the devkit {devkit.path} "
                              "(was the model trained on this data set?)")
    return devkit.ilsvrc_ids(classes) - 1


def image_index(folder: str | Path) -> ImageIndex:
    """Every image of a flat folder, in ascending file-name order, unlabelled."""
    names = list_images(folder)
    if not names:
        raise DataError(f"{folder}: no images (.JPEG/.jpg/.png) to predict")
    return ImageIndex(Path(folder), tuple(names), np.full(len(names), -1, dtype=np.int64), ())


def score_shard(model: torch.nn.Module, state: dict, images: ImageIndex, columns: np.ndarray, num_columns: int,
                dist: DistInfo, device: str, ten_crop: bool, batch_size: int,
                exclude: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows: (positions into images.files, devkit-ordered probabilities)."""
    from pipeline.loader import EvalLoader

    cfg = config_from_dict(state["config"])
    torch_device = next(model.parameters()).device
    loader = EvalLoader(images, batch_size=batch_size, rank=dist.rank, world_size=dist.world_size,
                        local_rank=dist.local_rank, device=device, crop_size=cfg.data.crop_size,
                        crop_ratio=cfg.data.eval_crop_ratio, ten_crop=ten_crop, dtype="float32", layout="NCHW",
                        threads=None, py_workers=0, exclude=exclude)
    positions, rows = [], []
    with loader, torch.no_grad():
        for batch, _labels, pos in loader:
            batch = batch.to(torch_device)
            crops = batch.shape[1] if ten_crop else 1
            flat = batch.reshape(-1, *batch.shape[-3:])
            probs = model(flat).float().softmax(dim=1).reshape(batch.shape[0], crops, -1).mean(dim=1)
            full = np.zeros((probs.shape[0], num_columns), dtype=np.float32)
            full[:, columns] = probs.cpu().numpy()
            positions.append(pos.numpy())
            rows.append(full)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, num_columns), dtype=np.float32)
    return np.concatenate(positions), np.concatenate(rows)


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
