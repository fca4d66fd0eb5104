"""The input specs of a run, resolved once from its config and its placement: the one place where config keys
become `pipeline.input_spec.TrainInput` / `EvalInput`.

Training (`training.build.build_loaders`), `senet predict`, `senet bench-input` and `senet
preview-augment` all call these functions, so a checkpoint's config gives the same eval batches to
the engine's validation and to `predict`, and `bench-input --config` measures the graph training
runs. What a command changes on top (predict's batch size, ten crops or another test size; a
benchmark's crop size) it says as an argument here, never by assembling a spec of its own.

Sizes: the training crop side per epoch is `data.crop_size` or, with `data.crop_size_start`, the
ramp of `pipeline.input_spec.CropSchedule` (unset ramp ends take FFCV's shape, scaled to
`train.epochs`). The eval side is `data.eval_crop_size`, else the final training size.
"""
from __future__ import annotations

from pipeline.augment import AugmentSpec
from pipeline.input_spec import CropSchedule, EvalInput, Runtime, TrainInput
from training.config import Config, batch_layout
from training.placement import Placement


def crop_schedule(cfg: Config) -> CropSchedule:
    """The training crop side of every epoch (`data.crop_size*`, `data.crop_ramp_*`, `train.epochs`)."""
    d = cfg.data
    if d.crop_size_start is None:
        return CropSchedule(d.crop_size)
    return CropSchedule.ffcv_ramp(d.crop_size, d.crop_size_start, cfg.train.epochs, d.crop_ramp_start, d.crop_ramp_end,
                                  d.crop_size_multiple)


def runtime(cfg: Config, place: Placement) -> Runtime:
    """Where this rank's input graphs run: the placement's device, GPU, threads and workers; the config's
    prefetch depth and hardware-decoder share."""
    return Runtime(device=place.device, device_id=place.gpu_index, threads=place.dali_threads,
                   py_workers=place.py_workers, prefetch=cfg.data.prefetch, hw_decoder_load=cfg.data.hw_decoder_load)


def train_input(cfg: Config, place: Placement) -> TrainInput:
    """What a training rank's batches hold and how they are produced."""
    d = cfg.data
    return TrainInput(batch_size=cfg.train.batch_size, crop=crop_schedule(cfg), aug=AugmentSpec.from_config(d),
                      seed=cfg.train.seed, sampling=d.sampling, samples_per_epoch=d.samples_per_epoch, dtype=d.dtype,
                      layout=batch_layout(cfg, place.device), mean=tuple(d.mean), std=tuple(d.std),
                      runtime=runtime(cfg, place))


def eval_crop_size(cfg: Config) -> int:
    """The test resolution: `data.eval_crop_size`, else the final training size."""
    return cfg.data.eval_crop_size or cfg.data.crop_size


def eval_input(cfg: Config, place: Placement, *, batch_size: int | None = None, crop_size: int | None = None,
               ten_crop: bool = False) -> EvalInput:
    """What an eval rank's batches hold: validation's by default; predict passes its batch size, `--ten-crop`
    and `--crop-size` (another test resolution), everything else stays the checkpoint's."""
    d = cfg.data
    return EvalInput(batch_size=batch_size or cfg.train.batch_size, crop_size=crop_size or eval_crop_size(cfg),
                     crop_ratio=d.eval_crop_ratio, ten_crop=ten_crop, dtype=d.dtype,
                     layout=batch_layout(cfg, place.device), mean=tuple(d.mean), std=tuple(d.std),
                     runtime=runtime(cfg, place))


def describe_inputs(cfg: Config) -> str:
    """One line for the log: the training sizes per epoch and the test resolution."""
    eval_size = eval_crop_size(cfg)
    return (f"training crops {crop_schedule(cfg).describe(cfg.train.epochs)}; eval at {eval_size} px (short side "
            f"{round(eval_size / cfg.data.eval_crop_ratio)}, centre crop)")
