"""Published weights in (`senet import-weights`), and any checkpoint's weights as a run's start (`train.init_from`).

An imported checkpoint is a model checkpoint (kind "weights"): the state dict for
`models.create_model(arch, num_classes=num_classes, **model_options)`, the class list (WNIDs, in the
order of the network's outputs), the preprocessing the source expects, and a resolved config holding
it (crop size and ratio, mean and std, fp32), so that `senet predict` scores it the way its source
measured it. Nothing is fetched: SOURCE is a file the user downloaded.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from models import create_model
from models.published import RELEASED, REPORTED, ConversionError, Preprocessing, convert, registry_name
from training.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, load_checkpoint
from training.config import ConfigError, config_to_dict, load_config
from training.ema import checkpoint_weights

log = logging.getLogger("senet.train")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A published state dict (a plain dict of tensors, or one wrapped in 'state_dict' / 'model').

    Raises:
        CheckpointError: unreadable, or not a state dict.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise CheckpointError(f"{path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return data


def import_weights(source_path: str | Path, arch: str, out: str | Path, classes: Sequence[str],
                   source: str = "pretrainedmodels") -> dict[str, Any]:
    """Convert a published SENet state dict into a senet model checkpoint at `out`.

    Args:
        source_path: the downloaded .pth file.
        arch: the network, in senet's or the source's naming.
        out: the checkpoint to write.
        classes: the WNIDs of the network's outputs, in output order.
        source: "pretrainedmodels" or "timm" (its legacy_* ports).

    Returns:
        A summary: arch, num_classes, the source's name, keys converted, the checkpoint path.

    Raises:
        ConversionError: an unknown or unsupported network, or weights that do not fit it.
        CheckpointError: an unreadable source file.
    """
    ours = registry_name(arch, source)
    state = read_state_dict(source_path)
    head = state.get("last_linear.weight", state.get("module.last_linear.weight"))
    if head is None:
        raise ConversionError(f"{source_path}: no last_linear.weight: not a {source} SENet state dict")
    num_classes = int(head.shape[0])
    if len(classes) != num_classes:
        raise ConversionError(f"{source_path}: the network has {num_classes} outputs but the class list has "
                              f"{len(classes)} WNIDs")
    model = create_model(ours, num_classes=num_classes)
    converted = convert(state, model.state_dict())
    model.load_state_dict(converted)  # strict: the conversion is complete
    prep = Preprocessing()
    cfg = load_config(None, [f"model.arch={ours}", f"model.num_classes={num_classes}", f"data.crop_size={prep.crop_size}",
                             f"data.eval_crop_ratio={prep.crop_ratio}", f"data.mean={list(prep.mean)}",
                             f"data.std={list(prep.std)}", "data.dtype=float32", "data.layout=NCHW",
                             "train.precision=fp32"])
    checkpoint = {
        "format_version": FORMAT_VERSION, "kind": "weights", "model": converted, "arch": ours,
        "num_classes": num_classes, "model_options": {}, "classes": list(classes), "config": config_to_dict(cfg),
        "preprocessing": {**asdict(prep), "mean": list(prep.mean), "std": list(prep.std),
                          "input_range": list(prep.input_range)},
        "source": {"from": source, "name": RELEASED[ours][source], "file": Path(source_path).name,
                   "sha256": _sha256(source_path)},
        "reported": {k: list(v) for k, v in REPORTED[ours].items()},
    }
    atomic_save(checkpoint, Path(out))
    return {"arch": ours, "num_classes": num_classes, "source": checkpoint["source"]["name"], "keys": len(state),
            "out": str(out)}


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def initialize_from(model: nn.Module, arch: str, classes: Sequence[str], path: str | Path, which: str = "best") -> str:
    """Load a checkpoint's weights into a fresh run's model; returns what was done, for the log.

    `which` (train.init_weights) picks the raw weights, the weight EMA, or "best": those the checkpoint's
    `best_weights` says won its validation (`training.ema.checkpoint_weights`). The classifier keeps the
    rows of the WNIDs both class lists share and starts the others anew (all of them when the lists share
    none), whatever the class counts.

    Raises:
        CheckpointError: unreadable, another architecture, no EMA to take, or weights that do not fit the model.
    """
    state = load_checkpoint(path, training=False)
    if state["arch"] != arch:
        raise CheckpointError(f"train.init_from = {str(path)!r} holds a {state['arch']}; this run trains a {arch}")
    try:
        chosen, kind = checkpoint_weights(state, which)
    except ValueError as e:
        raise CheckpointError(f"train.init_from = {str(path)!r} with train.init_weights = {which!r}: {e}") from None
    weights = dict(chosen)
    ours = model.state_dict()
    fc = [k for k in ("fc.weight", "fc.bias") if k in weights]
    head = {k: weights.pop(k) for k in fc}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {arch} ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    theirs = {wnid: i for i, wnid in enumerate(state["classes"])}
    kept = [(i, theirs[w]) for i, w in enumerate(classes) if w in theirs]
    with torch.no_grad():
        for key, value in head.items():
            for i, j in kept:
                ours[key][i] = value[j]
    source = f"{path} ({'its weight EMA' if kind == 'ema' else 'its raw weights'})"
    if len(kept) == len(classes) == len(theirs):
        return f"initialised from {source}: every layer, the classifier included ({len(kept)} classes)"
    return (f"initialised from {source}: every layer but the classifier, of which {len(kept)} of {len(classes)} "
            f"rows (the classes both share) were kept and {len(classes) - len(kept)} start anew")


def check_init_from(path: str | None) -> None:
    """The preflight's check of `train.init_from`: the file exists.

    Raises:
        ConfigError: it does not.
    """
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(f"train.init_from = {path!r}: no such file (a senet checkpoint, or one written by "
                          f"`senet import-weights`)")
