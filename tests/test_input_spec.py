"""The input spec: described once, resolved once from a config, the same for every command; the training crop
size per epoch as configured; the test resolution independent of it.

Real DALI on the CPU over the session's small synthetic tree for the loader checks; the rest is pure.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.datasets import index_train, index_val
from pipeline.devkit import load_devkit
from pipeline.input_spec import CropSchedule
from pipeline.loader import EvalLoader, TrainLoader
from senet.cli import build_parser
from senet.cmd_input import bench_spec
from training.build import build_loaders, load_data
from training.config import ConfigError, config_to_dict, load_config
from training.inputs import crop_schedule, eval_input, train_input
from training.placement import place_run
from training.predict import checkpoint_config, predict_input


def sizes(*sets: str) -> list[int]:
    cfg = load_config(None, list(sets))
    return crop_schedule(cfg).sizes(cfg.train.epochs)


def test_the_crop_size_per_epoch_is_the_configured_ramp() -> None:
    # FFCV's rn50_88_epochs.yaml: 160 up to epoch 65, 192 from epoch 76, multiples of 32 in between.
    ffcv = sizes("train.epochs=88", "data.crop_size=192", "data.crop_size_start=160", "data.crop_ramp_start=65",
                 "data.crop_ramp_end=76")
    assert ffcv == [160] * 71 + [192] * 17
    assert sizes("train.epochs=88", "data.crop_size=192", "data.crop_size_start=160") == ffcv  # null ramp: that shape
    # 40 epochs, null ramp: FFCV's shape scaled (65/88 and 76/88 of 40: epochs 30 and 35), 32-px steps between.
    assert sizes("train.epochs=40", "data.crop_size=224", "data.crop_size_start=128") == \
        [128] * 31 + [160] * 2 + [192] * 2 + [224] * 5
    assert sizes("train.epochs=5", "data.crop_size=64", "data.crop_size_start=32", "data.crop_ramp_start=1",
                 "data.crop_ramp_end=3", "data.crop_size_multiple=16") == [32, 32, 48, 64, 64]
    assert sizes("train.epochs=3", "data.crop_size=96") == [96, 96, 96]  # off: the final size throughout
    # sizes off the grid are never passed: the ends are exact, the ramp stays between them
    odd = CropSchedule(final=100, start=70, ramp_start=0, ramp_end=4, multiple=32)
    assert odd.sizes(5) == [70, 70, 96, 96, 100]


@pytest.mark.parametrize("sets, named", [
    (("data.crop_size=128", "data.crop_size_start=160"), "data.crop_size_start = 160"),
    (("train.epochs=10", "data.crop_size_start=128", "data.crop_ramp_end=12"), "data.crop_ramp_end = 12"),
    (("data.crop_size_start=128", "data.crop_ramp_start=8", "data.crop_ramp_end=4"), "data.crop_ramp_start = 8"),
    (("train.ema_decay=1.0",), "train.ema_decay"),
])
def test_schedule_and_ema_mistakes_are_one_line_naming_the_key(sets: tuple[str, ...], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, list(sets))


@pytest.fixture
def config_file(small_tree: Path, tmp_path: Path) -> Path:
    """A config whose input differs from every default: progressive sizes, its own test size, fp32 NHWC, mean/std."""
    path = tmp_path / "input.yaml"
    path.write_text(f"""model: {{arch: se_resnext_tiny, num_classes: 6}}
data:
  root: {small_tree}
  cache_dir: {tmp_path / 'cache'}
  crop_size: 64
  crop_size_start: 32
  crop_ramp_start: 1
  crop_ramp_end: 3
  crop_size_multiple: 16
  eval_crop_size: 80
  eval_crop_ratio: 0.8
  dtype: float32
  layout: NHWC
  mean: [120.0, 115.0, 100.0]
  std: [60.0, 58.0, 57.0]
  rotation: 5.0
  hue: 0.1
  sampling: shuffle
  samples_per_epoch: 24
  py_workers: 0
  threads: 1
  prefetch: 3
train: {{device: cpu, epochs: 4, batch_size: 4, seed: 5}}
""")
    return path


def test_training_predict_and_bench_input_build_the_same_specs_from_one_config(config_file: Path) -> None:
    cfg = load_config(config_file)
    data = load_data(cfg)
    train, val = build_loaders(cfg, place_run(cfg), data)  # what `senet train` feeds and validates with
    with train, val:
        assert train.spec.crop.sizes(4) == [32, 32, 48, 64] and train.spec.aug.hue == 0.1
        assert (train.spec.dtype, train.spec.layout, train.spec.mean) == ("float32", "NHWC", (120.0, 115.0, 100.0))
        assert (val.spec.crop_size, val.spec.crop_ratio, val.spec.resize_shorter) == (80, 0.8, 100)

        # senet predict: the config as a checkpoint stores it, on the same device, with its defaults
        saved = checkpoint_config({"config": config_to_dict(cfg)}, "ckpt.pt")
        spec, _ = predict_input(saved, "cpu")
        assert spec == val.spec
        assert predict_input(saved, "cpu", crop_size=96, ten_crop=True)[0] == replace(val.spec, crop_size=96,
                                                                                        ten_crop=True)
        # senet bench-input --config: the training input, measured at every size of its schedule
        args = build_parser().parse_args(["bench-input", str(cfg.data.root), "--config", str(config_file)])
        bench, measured, _ = bench_spec(args)
        assert bench.input == train.spec and measured == [32, 48, 64]


def test_the_size_changes_at_epoch_boundaries_and_the_test_size_is_its_own(clean, small_tree: Path) -> None:
    """One loader across a size change, against one positioned at the later epoch directly (a resume): the same
    bits; the eval loader at its own size, whatever the training size."""
    index, bad = clean
    cfg = load_config(None, ["train.device=cpu", "train.epochs=2", "train.batch_size=6", "data.crop_size=48",
                             "data.crop_size_start=32", "data.crop_ramp_start=0", "data.crop_ramp_end=1",
                             "data.crop_size_multiple=16", "data.eval_crop_size=40", "data.py_workers=1",
                             "data.threads=1", "data.dtype=float32"])
    place = place_run(cfg)
    with TrainLoader(index, train_input(cfg, place), exclude=bad) as loader:
        first = next(iter(loader))[0]
        loader.set_epoch(1)
        batches = iter(loader)
        second = [next(batches)[0]]
        state = loader.state_dict()  # mid-epoch, after the size change
        second += [x for x, _ in batches]
        assert loader.stats["rebuilds"] == 0
    assert first.shape[-2:] == (32, 32) and {x.shape[-2:] for x in second} == {torch.Size([48, 48])}
    with TrainLoader(index, train_input(cfg, place), exclude=bad) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        rest = [x for x, _ in resumed]
    assert len(rest) == len(second) - 1 and all(torch.equal(a, b) for a, b in zip(second[1:], rest))

    val = index_val(small_tree, load_devkit(small_tree / "ILSVRC2012_devkit_t12"), index_train(small_tree).classes)
    with EvalLoader(val, eval_input(cfg, place)) as ev:
        assert next(iter(ev))[0].shape == (6, 3, 40, 40)
    assert eval_input(load_config(None, ["data.crop_size=192", "data.crop_size_start=128"]), place).crop_size == 192
