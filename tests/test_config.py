"""Configuration: typed, layered, strict; every error names the key and the value."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import Config, ConfigError, batch_layout, config_reference, dump_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe: Path) -> None:
    assert isinstance(load_config(recipe), Config)


def test_paper_recipe_values() -> None:
    cfg = load_config(REPO / "configs/se_resnext50_32x4d.yaml")
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node * cfg.train.batch_size == 1024
    assert (cfg.optim.lr, cfg.optim.reference_batch, cfg.optim.momentum, cfg.optim.weight_decay) == (0.6, 1024, 0.9, 1e-4)
    assert (cfg.optim.schedule, cfg.optim.step_epochs, cfg.optim.gamma, cfg.train.epochs) == ("step", 30, 0.1, 100)
    senet = load_config(REPO / "configs/senet154.yaml")
    assert senet.slurm.nodes * senet.slurm.gpus_per_node * senet.train.batch_size == 2048
    assert (senet.optim.lr, senet.model.dropout) == (1.0, 0.2) and senet.optim.label_smoothing > 0


def test_fast_recipe_values() -> None:
    """configs/se_resnext50_fast.yaml says what its comments and the README's recipe table say."""
    from training.inputs import crop_schedule, eval_crop_size

    cfg = load_config(REPO / "configs/se_resnext50_fast.yaml")
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node * cfg.train.batch_size == 1024 and cfg.train.epochs == 40
    assert crop_schedule(cfg).sizes(40) == [160] * 33 + [192] * 7 and eval_crop_size(cfg) == 256
    assert (cfg.optim.schedule, cfg.optim.warmup_epochs, cfg.optim.label_smoothing) == ("linear", 2, 0.1)
    assert cfg.train.ema_decay == 0.9998 and not cfg.optim.decay_bn_and_bias


def test_overrides_convert_types_and_win_over_the_file() -> None:
    cfg = load_config(REPO / "configs/demo.yaml", ["train.epochs=3", "optim.lr=0.05", "data.exclude_file=/x/ex.txt",
                                                    "model.dropout=null", "data.sampling=shuffle"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.data.exclude_file == "/x/ex.txt"
    assert cfg.model.dropout is None and cfg.data.sampling == "shuffle"
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # an int is a valid float


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown section 'trian' (did you mean 'train'?)"),
    ("train.epochs=three", "train.epochs must be an integer, got 'three'"),
    ("train.epochs=2.5", "train.epochs must be an integer"),
    ("train.epochs=0", "train.epochs = 0 is below the minimum 1"),
    ("train.device=tpu", "train.device = 'tpu' is not one of 'gpu', 'cpu'"),
    ("data.flip=1.5", "data.flip = 1.5 is above the maximum 1.0"),
    ("model.channels_last=yes please", "model.channels_last must be true or false"),
    ("data.min_area=0.9", None),  # valid alone ...
    ("epochs=3", "the key must be section.key"),
    ("train.epochs", "expected section.key=value"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(override: str, message: str | None) -> None:
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_layout_auto_follows_the_models_memory_format() -> None:
    """auto: NHWC where the model runs channels_last (a GPU), NCHW where it does not; an explicit layout stays."""
    auto = load_config(None)
    assert auto.data.layout == "auto" and auto.model.channels_last
    assert (batch_layout(auto, "gpu"), batch_layout(auto, "cpu")) == ("NHWC", "NCHW")
    assert batch_layout(load_config(None, ["model.channels_last=false"]), "gpu") == "NCHW"
    assert batch_layout(load_config(None, ["data.layout=NCHW"]), "gpu") == "NCHW"
    assert batch_layout(load_config(None, ["data.layout=NHWC"]), "cpu") == "NHWC"


def test_relations_between_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.min_area = 0.9 exceeds data.max_area = 0.5"):
        load_config(None, ["data.min_area=0.9", "data.max_area=0.5"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'train.batchsize' \(did you mean 'train.batch_size'\?\)"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/senet154.yaml", ["slurm.additional={reservation: big}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(cfg))
    assert load_config(saved) == cfg


def test_reference_documents_every_key() -> None:
    ref = config_reference()
    for key in ("model.arch", "model.num_classes", "data.root", "train.device", "data.sampling", "data.crop_size",
                "train.epochs", "train.batch_size", "train.checkpoint_every", "train.seed", "optim.lr",
                "optim.reference_batch", "data.cache_dir", "data.exclude_file", "slurm.nodes"):
        assert f"`{key}`" in ref


def test_the_committed_reference_matches_the_code() -> None:
    """docs/config.md is generated (`senet config-reference --out docs/config.md`); it must not drift."""
    assert config_reference() in (REPO / "docs" / "config.md").read_text()
