"""Published SENet weights in: the six released networks give the reference implementation's logits, an
imported checkpoint scores through `senet predict`, and any checkpoint can start a run (`train.init_from`).

The reference is the real `pretrainedmodels` package (installed without its dependencies by `make
install`: importing the package needs torchvision, so its `models/senet.py` is loaded by file path),
with random weights and random BatchNorm statistics: equal logits prove the conversion, not just equal
parameter counts.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from models.published import RELEASED, ConversionError, convert, registry_name
from pipeline.devkit import Synset, write_devkit
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import ConfigError, load_config
from training.ema import checkpoint_weights
from training.weights import initialize_from

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    spec = importlib.util.find_spec("pretrainedmodels")  # finds the package without importing it (no torchvision)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the reference package is not installed: pip install --no-deps pretrainedmodels")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "senet.py"
    module_spec = importlib.util.spec_from_file_location("pretrainedmodels_senet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def random_reference(reference: ModuleType, name: str, seed: int = 1) -> torch.nn.Module:
    """The source's network with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(reference, name)(num_classes=1000, pretrained=None)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RELEASED))
def test_converted_weights_give_the_reference_logits(reference: ModuleType, arch: str) -> None:
    source = random_reference(reference, RELEASED[arch]["pretrainedmodels"])
    ours = create_model(arch, num_classes=1000).eval()  # the registry's defaults are the released network
    ours.load_state_dict(convert(source.state_dict(), ours.state_dict()))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = source(x), ours(x)
    assert expected.shape == got.shape == (2, 1000)
    assert (expected - got).abs().max().item() <= 1e-5


def test_names_sources_and_refusals() -> None:
    assert registry_name("legacy_seresnext50_32x4d", "timm") == "se_resnext50_32x4d"
    assert registry_name("senet154", "pretrainedmodels") == registry_name("legacy_senet154", "timm") == "senet154"
    with pytest.raises(ConversionError, match="not a released Caffe SENet .* legacy_seresnet50"):
        registry_name("seresnext50_32x4d", "timm")
    with pytest.raises(ConversionError, match="not one of the released SENets"):
        registry_name("resnet50", "pretrainedmodels")


def test_weights_of_another_network_are_one_line_naming_the_keys(reference: ModuleType) -> None:
    source = random_reference(reference, "se_resnet50").state_dict()
    with pytest.raises(ConversionError, match=r"does not fit"):
        convert(source, create_model("se_resnext50_32x4d", num_classes=1000).state_dict())
    source["layer9.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"1 unexpected source key\(s\) \(layer9.0.conv1.weight"):
        convert(source, create_model("se_resnet50", num_classes=1000).state_dict())


@pytest.fixture(scope="module")
def imported(reference: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random SE-ResNeXt-50 saved as pretrainedmodels does, a 1000-class devkit, four val images."""
    tmp = tmp_path_factory.mktemp("weights")
    source = tmp / "se_resnext50_32x4d-random.pth"
    torch.save(random_reference(reference, "se_resnext50_32x4d").state_dict(), source)
    wnids = sorted(f"n{7 * i + 1000:08d}" for i in range(1000))
    ids = np.random.default_rng(0).permutation(1000) + 1  # devkit IDs in another order than sorted WNIDs
    leaves = [Synset(int(ids[i]), w, f"class {i}", "", (), 0, 1) for i, w in enumerate(wnids)]
    write_devkit(tmp / "devkit", sorted(leaves, key=lambda s: s.ilsvrc_id), [int(ids[0])] * 4)
    (tmp / "val").mkdir()
    for n in range(4):
        pixels = np.random.default_rng(n).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / "val" / f"ILSVRC2012_val_{n + 1:08d}.JPEG", quality=90)
    return {"source": source, "devkit": tmp / "devkit", "val": tmp / "val", "tmp": tmp}


@pytest.mark.slow
def test_import_weights_then_predict_scores_with_the_sources_preprocessing(imported: dict[str, Path]) -> None:
    out = imported["tmp"] / "sx50.pt"
    senet = [sys.executable, "-m", "senet"]
    done = subprocess.run(senet + ["import-weights", str(imported["source"]), "--arch", "se_resnext50_32x4d", "--out",
                                   str(out), "--devkit", str(imported["devkit"])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == "se_resnext50_32x4d" and ckpt["num_classes"] == 1000 and ckpt["model_options"] == {}
    assert ckpt["classes"] == sorted(ckpt["classes"]) and len(ckpt["classes"]) == 1000
    assert ckpt["preprocessing"]["crop_size"] == 224 and ckpt["preprocessing"]["crop_ratio"] == 0.875
    assert ckpt["config"]["data"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert ckpt["source"]["name"] == "se_resnext50_32x4d" and ckpt["reported"]["pretrainedmodels"][0] == 79.076
    model = create_model(ckpt["arch"], num_classes=ckpt["num_classes"], **ckpt["model_options"])
    model.load_state_dict(ckpt["model"])  # a plain senet model

    with pytest.raises(CheckpointError, match="imported weights, not a run to resume"):
        load_checkpoint(out)
    submission = imported["tmp"] / "sub.txt"
    done = subprocess.run(senet + ["predict", str(out), str(imported["val"]), "--devkit", str(imported["devkit"]),
                                   "--out", str(submission), "--batch-size", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = submission.read_text().splitlines()
    assert len(lines) == 4 and all(len(set(map(int, line.split()))) == 5 for line in lines)

    bad = subprocess.run(senet + ["import-weights", str(imported["source"]), "--arch", "seresnext50_32x4d", "--from",
                                  "timm", "--out", str(out), "--devkit", str(imported["devkit"])],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "legacy_" in bad.stderr


def test_a_run_starts_from_a_checkpoint_keeping_the_rows_of_shared_classes(learned: dict[str, Path]) -> None:
    best = learned["run"] / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    weights, _ = checkpoint_weights(state)  # train.init_weights' default: those best.pt names (raw or its EMA)
    theirs = state["classes"]
    classes = (theirs[2], "n99999991", theirs[0])  # two shared WNIDs, one new class
    model = create_model("se_resnext_tiny", num_classes=3, channels_last=False)
    fresh_fc = model.fc.weight.detach().clone()
    note = initialize_from(model, "se_resnext_tiny", classes, best)
    assert "2 of 3 rows" in note
    assert torch.equal(model.fc.weight[0], weights["fc.weight"][2])
    assert torch.equal(model.fc.weight[2], weights["fc.weight"][0])
    assert torch.equal(model.fc.weight[1], fresh_fc[1])  # the new class starts anew
    assert torch.equal(model.stem[0].weight, weights["stem.0.weight"])
    with pytest.raises(CheckpointError, match="holds a se_resnext_tiny; this run trains a se_resnet_tiny"):
        initialize_from(create_model("se_resnet_tiny", num_classes=3), "se_resnet_tiny", classes, best)


def test_init_from_in_a_run_and_resume_takes_precedence(learned: dict[str, Path], tmp_path: Path) -> None:
    from tests.helpers import train_demo_recipe

    best = learned["run"] / "checkpoints" / "best.pt"
    sets = (f"train.init_from={best}", "train.epochs=1", "data.samples_per_epoch=64")
    out = tmp_path / "finetune"
    done = train_demo_recipe(learned["data"], learned["cache"], out, 1, *sets)
    assert done.returncode == 0 and "initialised from" in done.stderr and "the classifier included" in done.stderr
    again = train_demo_recipe(learned["data"], learned["cache"], out, 1, *sets[:1], "train.epochs=2",
                              "data.samples_per_epoch=64")
    assert again.returncode == 0 and "resumed from step" in again.stderr and "initialised from" not in again.stderr


def test_a_missing_init_from_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from training.build import preflight

    cfg = load_config(None, [f"data.root={tmp_path}", f"train.init_from={tmp_path / 'nowhere.pt'}"])
    with pytest.raises(ConfigError, match="train.init_from = .*: no such file"):
        preflight(cfg)
