"""Run configuration: typed, layered (defaults <- YAML <- `key=value` overrides), strict and saved.

Every key is a dataclass field whose `metadata` carries its meaning (`help`) and its accepted range
(`min`/`max`) or values (`choices`); the same metadata generates the configuration reference, so the
documentation cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import logging

import yaml

from pipeline.datasets import DEFAULT_CACHE_DIR

log = logging.getLogger("senet.config")
# Keys that moved: old "section.key" -> new "section.key" (the old name is still read, with a warning).
MOVED = {"data.device": "train.device"}


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and the value."""


def _key(default: Any, help: str, **limits: Any) -> Any:
    """A config field: default, one-line meaning and validation limits (min, max, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _key("se_resnext50_32x4d", "registered model name (`models.list_models()`)")
    num_classes: int = _key(1000, "number of output classes; must equal the data set's", min=2)
    dropout: float | None = _key(None, "dropout before the classifier; null keeps the model's default", min=0.0, max=0.95)
    zero_init_last_bn: bool = _key(True, "zero-init each block's last BN gamma (blocks start as identities)")
    channels_last: bool = _key(True, "channels_last memory format (faster convolutions on GPU)")
    stride_in_1x1: bool | None = _key(None, "ResNet stride on the first 1x1 (Caffe) or on the 3x3 (v1.5); null = the name's own")


@dataclass(frozen=True)
class DataConfig:
    root: str = _key("", "ILSVRC2012 root (train/, val/, test/, ILSVRC2012_devkit_t12/) or a folder of class folders")
    file_list: str | None = _key(None, "optional list of `relative/path label` lines, relative to `root`")
    devkit: str | None = _key(None, "devkit folder; default ROOT/ILSVRC2012_devkit_t12")
    sampling: Literal["class_aware", "shuffle"] = _key("class_aware", "Relay-BP class-balanced order, or a plain shuffle")
    samples_per_epoch: int | None = _key(None, "samples per epoch over all ranks; null = the training set's size", min=1)
    crop_size: int = _key(224, "training crop side in pixels (320 for the ILSVRC 2017 entry); with progressive resizing "
                          "the final one", min=16, max=1024)
    crop_size_start: int | None = _key(None, "progressive resizing: the crop side of the first epochs, growing to "
                                       "data.crop_size; null = off", min=16, max=1024)
    crop_ramp_start: int | None = _key(None, "progressive resizing: the last epoch (counted from 0) at "
                                       "data.crop_size_start, where the linear ramp starts; null = round(65/88 x "
                                       "train.epochs), the shape of FFCV's rn50_88_epochs.yaml (65 of 88)", min=0)
    crop_ramp_end: int | None = _key(None, "progressive resizing: the first epoch (from 0) at data.crop_size; null = "
                                     "round(76/88 x train.epochs), FFCV's 76 of 88", min=0)
    crop_size_multiple: int = _key(32, "progressive resizing: sizes inside the ramp are rounded to multiples of this",
                                   min=1, max=256)
    eval_crop_size: int | None = _key(None, "eval crop side (validation and senet predict); null = data.crop_size; "
                                      "testing above the training size can score higher (FixRes, arXiv:1906.06423)",
                                      min=16, max=1024)
    eval_crop_ratio: float = _key(0.875, "eval: resize the short side to crop/ratio, then center-crop", min=0.1, max=1.0)
    min_area: float = _key(0.08, "random-size crop: smallest area fraction", min=0.01, max=1.0)
    max_area: float = _key(1.0, "random-size crop: largest area fraction", min=0.01, max=1.0)
    min_aspect: float = _key(0.75, "random-size crop: smallest aspect ratio (w/h)", min=0.1, max=10.0)
    max_aspect: float = _key(4.0 / 3.0, "random-size crop: largest aspect ratio (w/h)", min=0.1, max=10.0)
    flip: float = _key(0.5, "probability of a mirror flip; 0 switches it off", min=0.0, max=1.0)
    rotation: float = _key(10.0, "rotation angle drawn uniformly from +-this many degrees; 0 = off", min=0.0, max=180.0)
    brightness: float = _key(0.4, "brightness factor drawn from [1-b, 1+b]; 0 = off", min=0.0, max=1.0)
    contrast: float = _key(0.4, "contrast factor drawn from [1-c, 1+c]; 0 = off", min=0.0, max=1.0)
    saturation: float = _key(0.4, "saturation factor drawn from [1-s, 1+s]; 0 = off", min=0.0, max=1.0)
    hue: float = _key(0.0, "hue shift drawn from +-h of a full turn (0.5 = 180 degrees); 0 = off", min=0.0, max=0.5)
    dtype: Literal["float16", "float32"] = _key("float16", "dtype of the normalized batch")
    layout: Literal["auto", "NCHW", "NHWC"] = _key("auto", "memory layout of the batch DALI produces; auto = NHWC "
                                                   "when the model runs channels_last (on a GPU), else NCHW")
    threads: int | None = _key(None, "DALI CPU threads per rank; null = the task's CPU share minus Python workers", min=1)
    py_workers: int = _key(2, "Python worker processes reading files for DALI's external_source", min=0, max=64)
    prefetch: int = _key(2, "batches DALI prepares ahead", min=1, max=16)
    mean: list = _key([123.675, 116.28, 103.53], "per-channel mean (RGB, 0-255 scale) that normalisation subtracts",
                      length=3, min=0.0, max=255.0)
    std: list = _key([58.395, 57.12, 57.375], "per-channel standard deviation (RGB, 0-255 scale) it divides by",
                     length=3, min=1e-3, max=255.0)
    hw_decoder_load: float = _key(0.65, "share of JPEGs for the GPU's hardware JPEG decoder (A100/H100/H200; ignored "
                                  "elsewhere); the rest is decoded by nvJPEG's hybrid CPU+GPU path", min=0.0, max=1.0)
    cache_dir: str = _key(DEFAULT_CACHE_DIR, "where the file index and the exclusion list of each data tree are kept")
    exclude_file: str | None = _key(None, "extra exclusion list (one relative path per line) to honour")
    stage_dir: str | None = _key(None, "node-local folder to copy a pack's shards to before training (NVMe, /dev/shm, "
                                 "$TMPDIR: $VARS expanded on the node); null reads the pack where it is")
    stage_fallback: Literal["read_in_place", "error"] = _key("read_in_place", "when staging finds too little "
                                                             "space: read the pack in place (a warning) or stop")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _key(0.6, "learning rate at `reference_batch`; scaled linearly to the global batch", min=0.0)
    reference_batch: int = _key(1024, "global batch at which `lr` is given", min=1)
    momentum: float = _key(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = _key(False, "Nesterov momentum")
    weight_decay: float = _key(1e-4, "L2 weight decay", min=0.0)
    decay_bn_and_bias: bool = _key(True, "apply weight decay to BN parameters and biases too (the paper does)")
    schedule: Literal["step", "cosine", "linear"] = _key("step", "LR schedule after warmup: step decay, cosine to 0, "
                                                         "or linear to 0 (FFCV's)")
    step_epochs: int = _key(30, "step schedule: divide the LR by 1/gamma every this many epochs", min=1)
    gamma: float = _key(0.1, "step schedule: LR factor at each step", min=0.0, max=1.0)
    warmup_epochs: float = _key(0.0, "linear warmup from 0 over this many epochs (large batches)", min=0.0)
    label_smoothing: float = _key(0.0, "label smoothing of the cross-entropy loss", min=0.0, max=0.5)
    fused: Literal["auto", "apex", "torch", "none"] = _key("auto", "fused SGD: apex FusedSGD, torch fused=True, or plain")


@dataclass(frozen=True)
class TrainConfig:
    device: Literal["gpu", "cpu"] = _key("gpu", "where a rank runs: 'gpu' (one GPU per rank, NCCL, DALI's mixed/GPU ops) "
                                         "or 'cpu' (gloo, CPU-only DALI); was data.device, still read with a warning")
    epochs: int = _key(100, "training epochs", min=1)
    init_from: str | None = _key(None, "checkpoint whose weights start a fresh run (a senet run's, or `senet "
                                 "import-weights`'); a resumed run continues from its own instead")
    batch_size: int = _key(32, "images per virtual rank and step: per process (per GPU) when each process is one "
                           "virtual rank", min=1)
    virtual_ranks: int | None = _key(None, "virtual ranks, each with its own train.batch_size batch and slice of the "
                                     "sample order, fixed when the run starts and kept by every resume; a process "
                                     "hosts virtual_ranks / processes of them (gradient accumulation), so any "
                                     "process count that divides it continues the same run; null = "
                                     "train.global_batch / train.batch_size, else the starting world size", min=1)
    global_batch: int | None = _key(None, "images per optimizer step over all virtual ranks (train.batch_size x "
                                    "train.virtual_ranks); give it instead of virtual_ranks to accumulate a big "
                                    "batch on few processes; null = that product", min=1)
    checkpoint_every: int = _key(1000, "write a checkpoint (checkpoints/ckpt-<step>.pt, named by last.pt) every this "
                                 "many steps, and at each epoch end", min=1)
    checkpoint_every_min: float | None = _key(None, "also write one when this many minutes have passed since the last, "
                                              "by rank 0's clock (the ranks agree every few steps); null = by steps "
                                              "only", min=0.0)
    keep_checkpoints: int = _key(3, "newest checkpoints kept, each verified by the sha256 in checkpoints/manifest.json "
                                 "(best.pt's is kept besides)", min=1)
    background_checkpoints: bool = _key(True, "rank 0 writes checkpoints in a background thread from a host copy of "
                                        "the state (one more copy of it in host memory) while training goes on; "
                                        "false = the step loop waits for each write")
    seed: int = _key(0, "seed of the sampling order, the augmentation draws and the initial weights", min=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _key("auto", "autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    compile: bool = _key(False, "torch.compile the model")
    torch_threads: int | None = _key(None, "torch's intra-op threads per process; null = its CPU share. On the CPU, "
                                     "fix it to keep a run bit-identical across process counts (torch's CPU "
                                     "convolution backward splits its sums by thread)", min=1)
    log_every: int = _key(50, "steps between metrics.jsonl rows", min=1)
    data_wait_warn: float = _key(0.05, "warn (once per log row at most) when a rank waited for data more than this "
                                 "fraction of the row's time, naming the input setting to try; 1 = never", min=0.0,
                                 max=1.0)
    eval_every: int = _key(1, "epochs between validations", min=1)
    ema_decay: float | None = _key(None, "weight EMA: decay per optimizer step (e.g. 0.9998: an average over about "
                                   "1/(1-decay) steps), no warm-up; validated beside the raw weights; null = off",
                                   min=0.0, max=0.999999)
    ema_every: int = _key(1, "update the weight EMA every this many optimizer steps, with decay**every: the same "
                          "average per step, less work", min=1)
    init_weights: Literal["best", "raw", "ema"] = _key("best", "which weights of train.init_from start the run: "
                                                      "best = those that won its validation (its best_weights), raw, "
                                                      "or its EMA")
    dist_timeout_s: int = _key(600, "seconds without a heartbeat after which a hung or dead rank is named and the "
                               "run stops (a dead rank's closed connection stops it at once); the collectives "
                               "time out a little later as a backstop", min=10)


@dataclass(frozen=True)
class SlurmConfig:
    nodes: int = _key(1, "servers", min=1)
    gpus_per_node: int = _key(8, "GPUs per server; one task per GPU", min=0)
    cpus_per_task: int = _key(10, "CPU cores per task (DALI threads + Python workers)", min=1)
    mem_gb: int | None = _key(None, "memory per node in GB; null = the partition's default", min=1)
    partition: str | None = _key(None, "Slurm partition")
    account: str | None = _key(None, "Slurm account")
    qos: str | None = _key(None, "Slurm QOS")
    constraint: str | None = _key(None, "Slurm node constraint (e.g. a GPU model)")
    time_min: int = _key(24 * 60, "time limit of one job allocation in minutes (requeue continues the run)", min=1)
    exclusive: bool = _key(True, "whole servers for the job")
    signal_delay_s: int = _key(120, "seconds before the time limit that the checkpoint signal comes", min=10)
    max_requeues: int = _key(10, "how many times a job that reaches its time limit is requeued (submitit's "
                             "max_num_timeout); preemptions are neither counted nor bounded", min=0)
    max_failure_requeues: int = _key(3, "how many times a run whose rank hung, died or failed continues in a new "
                                     "job without the suspect node(s), counted in RUN/failures.jsonl; deterministic "
                                     "failures (config error, NaN loss, the same exception at the same step) are not retried",
                                     min=0)
    output_root: str = _key("runs", "shared folder holding one run folder per job")
    additional: dict = _key({}, "extra sbatch parameters, e.g. {'reservation': 'x'}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "slurm": SlurmConfig}


def load_config(path: str | Path | None, overrides: typing.Sequence[str | tuple[str, str]] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides, validated.

    Args:
        path: a YAML file with some of the sections `model`, `data`, `optim`, `train`, `slurm`; None for defaults.
        overrides: `section.key=value` strings; the value is parsed as YAML (`3`, `0.1`, `null`, `true`, `[1, 2]`).
            An item may be a (where, item) pair, `where` naming its origin in errors (`read_overrides`).

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: naming the file, the key and the offending value.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}, got {type(raw).__name__}")
    raw = _migrate({k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}, where)
    cfg = config_from_dict(raw, where)
    for given in overrides:  # each override validated on its own, so an error names it
        origin, item = given if isinstance(given, tuple) else (f"--set {given}", given)
        section, key, value = _parse_override(item)
        if f"{section}.{key}" in MOVED:  # an old name given on the command line wins like any override
            new = MOVED[f"{section}.{key}"]
            log.warning("--set %s.%s: the key is %s now; read as --set %s=%s", section, key, new, new, value)
            section, key = new.split(".")
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping")
        raw.setdefault(section, {})[key] = value
        cfg = config_from_dict(raw, origin)
    return cfg


def read_overrides(path: str | Path) -> list[tuple[str, str]]:
    """The `section.key=value` lines of a settings file (`--set-file`), each with its FILE:LINE origin.

    The format is `--set`'s, one item per line; blank lines and lines starting with `#` are skipped
    (`senet bench-input --tune` writes such a file).

    Raises:
        ConfigError: the file cannot be read, or a line is not `section.key=value`.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the settings file ({e.strerror})") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            _parse_override(line)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        items.append((where, line))
    return items


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Validate a nested dict (as read from YAML or a checkpoint) into a Config (moved keys are read too)."""
    raw = _migrate(raw, where)
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown section '{name}'{_suggest(name, SECTIONS)}; sections: {', '.join(SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{name}' must be a mapping of keys, got {values!r}")
        sections[name] = _build_section(name, SECTIONS[name], values, where)
    cfg = Config(**sections)
    _check_relations(cfg, where)
    return cfg


def _migrate(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """`raw` with the keys of `MOVED` under their new names (a copy; a warning for each).

    Raises:
        ConfigError: both the old and the new name are given, with different values.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in MOVED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        if out.get(new_section) is None:
            out[new_section] = {}
        target = out[new_section]
        if not isinstance(target, dict):
            continue  # config_from_dict names the malformed section
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"{where}: {old} = {value!r} (deprecated) contradicts {new} = {target[new_key]!r}; "
                              f"keep only {new}")
        target.setdefault(new_key, value)
        log.warning("%s: %s is deprecated, it is %s now (read as %s = %r)", where, old, new, new, value)
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of every key (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def runs_channels_last(cfg: Config, device: str) -> bool:
    """Whether the model is kept in channels_last memory on `device`: only on a GPU, where its convolutions
    are faster that way (on the CPU the model stays NCHW)."""
    return cfg.model.channels_last and device == "gpu"


def batch_layout(cfg: Config, device: str) -> str:
    """`data.layout` resolved for `device`: 'auto' is NHWC when the model runs channels_last, else NCHW.

    An NHWC batch is handed to the model as an NCHW view of channels_last memory (`engine.prepare_batch`),
    exactly the model's own format; an NCHW batch would be copied into that format at every step.
    """
    if cfg.data.layout != "auto":
        return cfg.data.layout
    return "NHWC" if runs_channels_last(cfg, device) else "NCHW"


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=3")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: the key must be section.key, e.g. optim.lr=0.3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return parts[0], parts[1], value


def _build_section(name: str, cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{name}.{key}'{_suggest(key, fields, name + '.')}")
        kwargs[key] = _validate(f"{name}.{key}", value, hints[key], fields[key].metadata, where)
    return cls(**kwargs)


def _validate(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any], where: str) -> Any:
    """Check `value` against the type hint and the field's limits; return it converted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    elif hint is list or origin is list:
        length = meta.get("length")
        if not isinstance(value, (list, tuple)) or (length and len(value) != length) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of {length or 'some'} numbers, got {value!r}")
        for v in value:
            if ("min" in meta and v < meta["min"]) or ("max" in meta and v > meta["max"]):
                raise ConfigError(f"{where}: {key} = {list(value)!r}: every value must lie in "
                                  f"[{meta.get('min')}, {meta.get('max')}]")
        return [float(v) for v in value]
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: {key} = {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: {key} = {value!r} is above the maximum {meta['max']}")
    return value


def _check_relations(cfg: Config, where: str) -> None:
    """Constraints between keys, which no single field can check."""
    t = cfg.train
    if t.global_batch is not None:
        if t.global_batch % t.batch_size:
            raise ConfigError(f"{where}: train.global_batch = {t.global_batch} is not a multiple of train.batch_size = "
                              f"{t.batch_size} (each virtual rank has a whole batch)")
        if t.virtual_ranks is not None and t.global_batch != t.batch_size * t.virtual_ranks:
            raise ConfigError(f"{where}: train.global_batch = {t.global_batch} but train.batch_size x "
                              f"train.virtual_ranks = {t.batch_size} x {t.virtual_ranks} = "
                              f"{t.batch_size * t.virtual_ranks}; give one of the two")
    d = cfg.data
    if d.min_area > d.max_area:
        raise ConfigError(f"{where}: data.min_area = {d.min_area} exceeds data.max_area = {d.max_area}")
    if d.min_aspect > d.max_aspect:
        raise ConfigError(f"{where}: data.min_aspect = {d.min_aspect} exceeds data.max_aspect = {d.max_aspect}")
    if d.crop_size_start is not None:
        if d.crop_size_start > d.crop_size:
            raise ConfigError(f"{where}: data.crop_size_start = {d.crop_size_start} exceeds data.crop_size = "
                              f"{d.crop_size} (the final size the ramp grows to)")
        if d.crop_ramp_start is not None and d.crop_ramp_end is not None and d.crop_ramp_start > d.crop_ramp_end:
            raise ConfigError(f"{where}: data.crop_ramp_start = {d.crop_ramp_start} is after data.crop_ramp_end = "
                              f"{d.crop_ramp_end}")
        for key in ("crop_ramp_start", "crop_ramp_end"):
            value = getattr(d, key)
            if value is not None and value > cfg.train.epochs:
                raise ConfigError(f"{where}: data.{key} = {value} is beyond train.epochs = {cfg.train.epochs}; the "
                                  f"ramp must end within the run (null = FFCV's shape, scaled to the epochs)")


def _suggest(word: str, known: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def config_reference() -> str:
    """Markdown table of every key: type, default and meaning, generated from the dataclasses."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            limits = [f"{k} {f.metadata[k]}" for k in ("min", "max") if k in f.metadata]
            meaning = f.metadata["help"] + (f" ({', '.join(limits)})" if limits else "")
            lines.append(f"| `{section}.{f.name}` | `{_type_name(hints[f.name])}` | `{default!r}` | {meaning} |")
    return "\n".join(lines) + "\n"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " \\| ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))
