"""Build, then fit: `build` assembles a run (the `Run` the loop trains) from a placement, a config and
whatever parts the caller brings; `training.engine.fit` trains it.

    r = build(cfg, place_run(cfg), Path("runs/x"))                  # everything from the config
    r = build(cfg, place, out, data=Data(classes), loaders=(ResidentLoader(x, y, 32), None))  # own parts
    try:
        summary = fit(r, resume="auto")
    finally:
        r.close()                                                    # loaders, process group

The order matters and lives here only: the process's threads are set, the data indexed, the node's
resources checked and the DALI loaders started (their Python workers fork now, before anything
touches CUDA), then the GPU is selected and the process group joined, and only then the model,
its DDP wrapper, the optimizer, the schedule and the metrics log are made.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from training import dist as distmod
from training.accumulate import VirtualGradients
from training.checkpoint_writer import CheckpointWriter
from training.config import Config, ConfigError, runs_channels_last
from training.control import RunControl
from training.ema import WeightEMA, ema_horizon_note
from training.health import Health, heartbeat_interval
from training.inputs import describe_inputs, eval_input, train_input
from training.metrics import MetricsLog
from training.optim import LRSchedule, build_optimizer
from training.placement import Placement, check_node, input_shm_bytes, mean_file_bytes
from training.precision import Precision
from training.run_folder import CHECKPOINTS, METRICS
from training.stragglers import StragglerWatch, SyncTimer, slow_down_from_env
from training.virtual import VirtualRanks, at_start, resolved
from training.weights import check_init_from

log = logging.getLogger("senet.train")


@dataclass
class Run:
    """Everything a step needs, built once by `build` (not an `args` bag: fixed fields, typed)."""

    cfg: Config
    place: Placement
    out: Path
    device: torch.device
    precision: Precision
    model: nn.Module  # the unwrapped model: what checkpoints hold
    train_model: nn.Module  # DDP / compiled wrapper used for training steps
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    virtual: VirtualRanks  # the run's virtual ranks and this process's share (training.virtual)
    gradients: VirtualGradients  # a step's gradient over all virtual ranks (training.accumulate)
    train_loader: Any
    val_loader: Any | None
    classes: tuple[str, ...]
    log: MetricsLog
    control: RunControl
    group: Any  # host control group for agreements (None = the world group, or a single process)
    checkpoints: CheckpointWriter  # rank 0 writes; the other ranks' writer does nothing
    health: Health  # heartbeats: names a hung, dead or failed rank (training.health)
    stragglers: StragglerWatch  # names the rank the others wait for (training.stragglers)
    ema: WeightEMA | None = None  # the weight EMA (train.ema_decay), None when off
    optimizer_kind: str = ""  # which SGD implementation (`training.optim.build_optimizer`)
    closers: list[Callable[[], None]] = field(default_factory=list)  # what `build` started, undone by `close`

    def close(self) -> None:
        """Stop what `build` started (the loaders it made, the process group it joined), once."""
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            close()


@dataclass(frozen=True)
class Data:
    """The class list (index -> WNID) and, unless the caller brings its own loaders, the images."""

    classes: tuple[str, ...]
    train: Any | None = None  # pipeline.datasets.ImageIndex
    val: Any | None = None  # ImageIndex with devkit labels, or None when the tree has no val/devkit
    exclude: frozenset[str] = frozenset()


def build(cfg: Config, place: Placement, out_dir: Path, *, control: RunControl | None = None, data: Data | None = None,
          loaders: tuple[Any, Any | None] | None = None, model: nn.Module | None = None) -> Run:
    """Assemble a run of `cfg` for this process: parts the caller gives are used as they are.

    Args:
        cfg: the resolved configuration.
        place: where this process runs (`training.placement.place_run(cfg)`).
        out_dir: the run folder (checkpoints, metrics, curves, config).
        control: checkpoint/stop requests from outside the loop; None = never asked.
        data: the class list and images (default: indexed from `data.root`).
        loaders: (train, val or None), each with the TrainLoader / EvalLoader interface (default: DALI
            loaders of `data`; any other loader, e.g. `pipeline.loader.ResidentLoader`, works).
        model: the unwrapped model (default: the registry's `model.arch`); moved to the device here.

    Raises:
        ConfigError: inconsistent configuration; PlacementError (a ConfigError): the node cannot host
            this rank as configured; DataError: unreadable data.
    """
    configure_process(place)
    virtual = at_start(cfg, place.dist.world_size, place.dist.rank)  # a resume may change it to its checkpoint's
    if place.is_main:
        log.info("placement: %s", place.describe())
    data = data or load_data(cfg)
    if cfg.data.stage_dir:
        data = stage_data(cfg, place, data)  # before the process group: the node's ranks copy shards first
    closers: list[Callable[[], None]] = []
    try:
        if loaders is None:
            check_input_resources(cfg, place, data)
            loaders = build_loaders(cfg, place, data, virtual)  # before CUDA/NCCL: DALI forks its Python workers
            closers += [loader.close for loader in loaders if loader is not None]
            if place.is_main:
                log.info("input: %s", describe_inputs(cfg))
        train_loader, val_loader = loaders
        timeout = distmod.process_group_timeout(cfg.train.dist_timeout_s, heartbeat_interval(cfg.train.dist_timeout_s))
        if distmod.init_distributed(place, timeout):
            closers.append(distmod.teardown_distributed)
        group = distmod.control_group(place.backend, timeout)
        control = control or RunControl()
        health = Health.start(place.dist.rank, place.dist.world_size, Path(out_dir), cfg.train.dist_timeout_s, group,
                              control.on_rank_failure)
        closers.append(health.close)
        distmod.check_distinct_gpus(place, group)
        return _assemble(cfg, place, Path(out_dir), data, train_loader, val_loader, model, control, group, health,
                         virtual, closers)
    except BaseException:
        for close in reversed(closers):
            close()
        raise


def _assemble(cfg: Config, place: Placement, out: Path, data: Data, train_loader: Any, val_loader: Any | None,
              model: nn.Module | None, control: RunControl, group: Any, health: Health, virtual: VirtualRanks,
              closers: list[Callable[[], None]]) -> Run:
    """Model, DDP wrapper, gradient reduction, optimizer, schedule, scaler and metrics log of this rank."""
    dist, device, precision = place.dist, place.torch_device, place.precision
    model = build_model(cfg, device) if model is None else model.to(device)
    optimizer, kind = build_optimizer(model, cfg.optim, place.device)
    train_model: nn.Module = model
    ddp, timer = None, None
    if dist.distributed:
        # broadcast_buffers=False: no broadcast of every BN buffer before every forward. Training-mode BN
        # normalises with the batch's own statistics, so the running statistics change no gradient; rank
        # 0's are the ones checkpoints hold, and `engine.train` broadcasts them before each evaluation.
        # Rank 0 only ever sends, so its buffers (and every checkpoint) are the same either way.
        ddp = train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            broadcast_buffers=False)
    # CPU: the virtual ranks' gradients added in one fixed order, exact whatever the world size; GPU: summed
    gradients = VirtualGradients(model, ddp, virtual, exact=device.type == "cpu")
    if ddp is not None:
        timer = SyncTimer(device)  # how long this rank waits for the others in each step
        timer.attach(ddp, gradients.hook)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    schedule = make_schedule(cfg, virtual, train_loader)
    ema = None
    if cfg.train.ema_decay is not None:
        ema = WeightEMA(model, cfg.train.ema_decay, cfg.train.ema_every)
        note = ema_horizon_note(cfg.train.ema_decay, schedule.total_steps)
        if note and dist.is_main:
            log.warning("%s", note)
    metrics = MetricsLog(out / METRICS, dist.is_main)
    closers.append(metrics.close)
    t = cfg.train
    checkpoints = CheckpointWriter(out / CHECKPOINTS, t.keep_checkpoints, t.background_checkpoints,
                                   t.checkpoint_every_min, dist.is_main, metrics)
    closers.append(checkpoints.close)  # closed before the metrics log: a landing write records its row
    stragglers = StragglerWatch(health.infos, dist.rank, cfg.train.log_every, timer, slow_down_from_env(dist.rank))
    return Run(cfg=cfg, place=place, out=out, device=device, precision=precision, model=model,
               train_model=train_model, optimizer=optimizer, scaler=precision.grad_scaler(), schedule=schedule,
               virtual=virtual, gradients=gradients, train_loader=train_loader, val_loader=val_loader,
               classes=tuple(data.classes), log=metrics, control=control, group=group, checkpoints=checkpoints,
               health=health, stragglers=stragglers, ema=ema, closers=closers, optimizer_kind=kind)


def make_schedule(cfg: Config, virtual: VirtualRanks, train_loader: Any) -> LRSchedule:
    """The LR schedule of the run's global batch; an epoch is each virtual rank's whole batches.

    Raises:
        ConfigError: a virtual rank's batch is larger than its share of an epoch.
    """
    steps_per_epoch = len(train_loader) // virtual.hosted
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} x {virtual.total} virtual ranks is larger than "
                          f"an epoch's samples; lower train.batch_size or raise data.samples_per_epoch")
    return LRSchedule(cfg.optim, virtual.global_batch, steps_per_epoch, cfg.train.epochs)


def use_virtual_ranks(r: Run, virtual: VirtualRanks) -> None:
    """Give the run's loader, gradient reduction and schedule the virtual ranks `virtual` (a resumed run's, when
    its checkpoint's differ from those it was built with), and write them into its config.

    Raises:
        ConfigError: the run's training loader cannot read other shards (a caller's own loader).
    """
    if virtual != r.virtual:
        shard = getattr(r.train_loader, "shard", None)
        if shard is None:
            raise ConfigError(f"the run resumes with {virtual.total} virtual ranks but its training loader "
                              f"({type(r.train_loader).__name__}) was made for {r.virtual.total} and cannot change its "
                              f"shards; set train.virtual_ranks={virtual.total}")
        shard(virtual.first, virtual.total, virtual.hosted)
        r.virtual = r.gradients.virtual = virtual
        r.schedule = make_schedule(r.cfg, virtual, r.train_loader)
    r.cfg = resolved(r.cfg, virtual)


def describe(r: Run) -> str:
    """One line for the log: model, device, processes and virtual ranks, global batch, peak LR, steps per epoch."""
    dist, v = r.place.dist, r.virtual
    return (f"{r.cfg.model.arch} on {r.device.type} x {dist.world_size} ({r.precision.name}, "
            f"{'DDP' if dist.distributed else '1 process'}), {v.describe()}, global batch {v.global_batch} "
            f"({v.batch_size} per virtual rank), peak lr {r.schedule.peak:.4g}, {r.schedule.steps_per_epoch} "
            f"steps/epoch, {r.cfg.train.epochs} epochs, optimizer {r.optimizer_kind}")


def preflight(cfg: Config, root_hint: str = "") -> None:
    """Cheap checks that should fail before any process starts (or any job queues), as one line naming the key.

    Cheap on a login node too: the class folders are counted, never the images.

    Args:
        cfg: the resolved configuration.
        root_hint: appended to the message about a missing data.root (e.g. how to skip the check).

    Raises:
        ConfigError: data.root missing, unknown model, model.num_classes != number of class folders, or a
            missing train.init_from file.
    """
    from models import list_models
    from pipeline.pack_reader import is_pack, read_manifest

    root = Path(cfg.data.root).expanduser()
    if not cfg.data.root or not root.is_dir():
        raise ConfigError(f"data.root = {cfg.data.root!r}: folder not found; set data.root in the config or "
                          f"--set data.root=DIR (a tree from `senet make-synthetic` works){root_hint}")
    if cfg.model.arch not in list_models():
        raise ConfigError(f"model.arch = {cfg.model.arch!r} is not a registered model; known: {', '.join(list_models())}")
    if is_pack(root):  # the pack's manifest knows its classes
        classes = len(read_manifest(root)["classes"])
        if classes != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but the pack {root} has {classes} classes; "
                              f"set model.num_classes={classes}")
    elif cfg.data.file_list is None:
        folder = root / "train" if (root / "train").is_dir() else root
        classes = sum(1 for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
        if classes and classes != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but {folder} has {classes} class folders; "
                              f"set model.num_classes={classes}")
    check_init_from(cfg.train.init_from)
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        log.warning("fp16 autocast on the CPU is slow and rarely useful; bf16 or fp32 are the usual CPU choices")


def configure_process(place: Placement) -> None:
    """Threads and determinism settings of this rank (nothing here touches CUDA)."""
    torch.set_num_threads(place.torch_threads)
    if place.device == "gpu":
        torch.backends.cudnn.benchmark = True  # fastest kernels; GPU runs are not promised bit-exact
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)  # the CPU resume test compares bits


def load_data(cfg: Config) -> Data:
    """Index the training and validation images and read the exclusion list (check-data's and the config's).

    Raises:
        ConfigError: model.num_classes differs from the data's classes. DataError: unreadable data.
    """
    from pipeline.datasets import index_file_list, index_train, index_val, load_exclusions
    from pipeline.devkit import find_devkit, load_devkit
    from pipeline.errors import DataError

    d = cfg.data
    root = Path(d.root).expanduser()
    if d.file_list:
        train = index_file_list(root / d.file_list, root)
    else:
        train = index_train(root, d.cache_dir)
    if cfg.model.num_classes != len(train.classes):
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but the training data has "
                          f"{len(train.classes)} classes; set model.num_classes={len(train.classes)}")
    val = None
    if (root / "val").is_dir():
        try:
            val = index_val(root, load_devkit(find_devkit(root, d.devkit)), train.classes)
        except DataError as e:
            raise DataError(f"validation set unusable: {e}") from None
    else:
        log.warning("%s has no val/ folder: no validation, best.pt is not written", root)
    exclude = frozenset(load_exclusions(root, d.cache_dir, d.exclude_file))
    return Data(tuple(train.classes), train, val, exclude)


def stage_data(cfg: Config, place: Placement, data: Data) -> Data:
    """The data read from node-local copies of a pack's shards (`data.stage_dir`); trees are read in place."""
    from pipeline.stage import stage

    staged = {}
    for name in ("train", "val"):
        index = getattr(data, name)
        if index is None or index.samples is None:
            continue
        samples, report = stage(index.samples, cfg.data.stage_dir, place.dist.local_rank, place.dist.local_world_size,
                                cfg.data.stage_fallback)
        staged[name] = replace(index, samples=samples)
        if place.dist.local_rank == 0 and "fallback" not in report:
            log.info("staged %d %s shards (%.2f GiB) in %s in %.1f s: %d copied by this rank, %d found verified",
                     report["shards"], name, report["bytes"] / 2**30, report["folder"], report["seconds"],
                     report["copied"], report["reused"])
    if not staged and place.is_main:
        log.warning("data.stage_dir is set but %s is not a pack (senet pack): the files are read where they are",
                    cfg.data.root)
    return replace(data, **staged)


def check_input_resources(cfg: Config, place: Placement, data: Data) -> None:
    """Shared memory and locked memory for this node's input pipelines (`training.placement.check_node`)."""
    from pipeline.dali import decoder_options, pinned_decoder_bytes

    train = data.train
    sample = train.samples.mean_bytes() if train.samples is not None else mean_file_bytes(train.root, train.files)
    pipelines = 1 + (data.val is not None)
    shm = input_shm_bytes(place, cfg.train.batch_size, sample, cfg.data.prefetch, pipelines)
    decoder = decoder_options(place.device, place.dali_threads, cfg.data.hw_decoder_load)
    check_node(place, shm_needed=shm, pinned_needed=pipelines * pinned_decoder_bytes(decoder, place.dali_threads))


def build_loaders(cfg: Config, place: Placement, data: Data,
                  virtual: VirtualRanks | None = None) -> tuple[Any, Any | None]:
    """The DALI train and val loaders of this rank, of the run's input specs: training reads the shards of the
    virtual ranks it hosts (default: those of a run starting now), validation its share of the images."""
    from pipeline.loader import EvalLoader, TrainLoader

    v = virtual or at_start(cfg, place.dist.world_size, place.dist.rank)
    train = TrainLoader(data.train, train_input(cfg, place), rank=v.first, world_size=v.total, hosted=v.hosted,
                        exclude=data.exclude)
    val = None
    if data.val is not None:
        try:  # every val image once over the processes
            val = EvalLoader(data.val, eval_input(cfg, place), rank=place.dist.rank, world_size=place.dist.world_size,
                             exclude=data.exclude)
        except BaseException:
            train.close()
            raise
    return train, val


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The model from the registry with the config's overrides, seeded so every run starts alike."""
    from models import create_model, model_options

    m = cfg.model
    wanted = {"dropout": m.dropout, "zero_init_last_bn": m.zero_init_last_bn, "stride_in_1x1": m.stride_in_1x1,
              "channels_last": runs_channels_last(cfg, cfg.train.device)}
    accepted = set(model_options(m.arch))
    for key in ("dropout", "stride_in_1x1"):
        if wanted[key] is not None and key not in accepted:
            raise ConfigError(f"model.{key} = {wanted[key]!r} does not apply to model.arch = {m.arch!r}; set it to null")
    overrides = {k: v for k, v in wanted.items() if v is not None and k in accepted}
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and in every run
    model = create_model(m.arch, num_classes=m.num_classes, **overrides).to(device)
    if overrides.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model
