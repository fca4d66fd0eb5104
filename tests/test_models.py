"""The SE model zoo: every registered model builds, runs and trains; sizes match arXiv:1709.01507."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import SqueezeExcitation, create_model, list_models, model_options
from models.blocks import Bottleneck
from models.complexity import complexity_report, count_macs, count_params, format_table, measure_latency
from models.se import scale_and_add

# 64 px is enough for every model: the ceil-mode pools keep BN-Inception's maps >= 2x2 at the end.
SMALL_INPUT = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: small inputs gain little from two, and on this shared 2-core sandbox a
    2-thread ResNet-152 step took 0.4 s alone but up to 30 s while other jobs ran (OpenMP threads
    wait on descheduled peers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta_model(name: str, **overrides: object) -> nn.Module:
    """Build on the meta device: shapes only, so the 115 M-parameter SENet-154 costs milliseconds."""
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models())
def test_one_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.fc.weight.detach().clone()
    loss = F.cross_entropy(model(torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT)), torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not torch.equal(before, model.fc.weight)


# --- sizes: parameters exactly, multiply-adds against the paper's Table 2 ---------------------------

EXACT_PARAMS = {  # torchvision / Cadene's pretrainedmodels, 1000 classes
    "resnet50": 25_557_032,
    "se_resnet50": 28_088_024,
    "se_resnext50_32x4d": 27_559_896,
    "senet154": 115_088_984,
}
PAPER_PARAMS_M = {  # arXiv:1709.01507, Table 2 and the SENet-154 release
    "resnet50": 25.6,
    "se_resnet50": 28.1,
    "se_resnext50_32x4d": 27.6,
    "se_resnet101": 49.3,
    "se_resnet152": 66.8,
    "se_resnext101_32x4d": 49.0,
    "senet154": 115.1,
}
PAPER_GFLOPS = {  # arXiv:1709.01507, Table 2 (multiply-adds at 224 x 224)
    "resnet50": 3.86,
    "se_resnet50": 3.87,
    "resnet101": 7.58,
    "se_resnet101": 7.60,
    "resnet152": 11.30,
    "se_resnet152": 11.32,
    "resnext50_32x4d": 4.24,
    "se_resnext50_32x4d": 4.25,
    "resnext101_32x4d": 7.99,
    "se_resnext101_32x4d": 8.00,
    "bn_inception": 2.03,
    "se_bn_inception": 2.04,
}


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_count(name: str) -> None:
    assert count_params(_meta_model(name)) == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name: str) -> None:
    assert round(count_params(_meta_model(name)) / 1e6, 1) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_multiply_adds_match_paper(name: str) -> None:
    gflops = count_macs(_meta_model(name), 224) / 1e9
    assert gflops == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def test_se_elementwise_terms_reproduce_the_paper_se_row() -> None:
    model = _meta_model("se_resnet50")
    assert round(count_macs(model, 224, se_elementwise=True) / 1e9, 2) == 3.87
    assert count_macs(_meta_model("resnet50"), 224, se_elementwise=True) == count_macs(_meta_model("resnet50"))


def test_count_macs_leaves_the_model_alone() -> None:
    model = create_model("se_resnet_tiny")
    weight = model.fc.weight.detach().clone()
    count_macs(model, 64)
    assert model.training and model.fc.weight.device.type == "cpu" and torch.equal(weight, model.fc.weight)


def test_macs_scale_with_input_area() -> None:
    model = _meta_model("resnet50")
    # Everything up to the global pool scales with the area; 224 -> 448 is exactly 4x the conv work.
    conv_only = count_macs(model, 224) - 2048 * 1000
    assert count_macs(model, 448) - 2048 * 1000 == 4 * conv_only


# --- SE semantics ------------------------------------------------------------------------------------


def test_se_gate_is_strictly_between_0_and_1() -> None:
    torch.manual_seed(0)
    se = SqueezeExcitation(64)
    gate = se(torch.randn(4, 64, 7, 7))
    assert gate.shape == (4, 64, 1, 1)
    assert (gate > 0).all() and (gate < 1).all()


def test_se_scales_each_channel_by_its_gate() -> None:
    torch.manual_seed(0)
    se = SqueezeExcitation(32, reduction=4)
    # A known input: channel c is the constant c + 1 plus a ramp over the map.
    ramp = torch.linspace(0, 1, 25).view(1, 1, 5, 5)
    x = (torch.arange(32.0).view(1, 32, 1, 1) + 1 + ramp).repeat(2, 1, 1, 1)
    squeezed = x.mean((2, 3))
    hidden = torch.relu(se.reduce.weight @ squeezed[0] + se.reduce.bias)
    expected_gate = torch.sigmoid(se.expand.weight @ hidden + se.expand.bias)
    out = se.scale(x)
    for c in range(32):
        torch.testing.assert_close(out[:, c], x[:, c] * expected_gate[c])


def test_fused_scale_and_add_is_identity_plus_scaled_branch() -> None:
    torch.manual_seed(0)
    identity, branch, gate = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3), torch.rand(2, 8, 1, 1)
    expected = identity + branch * gate
    # With autograd recording, a new tensor (branch is saved for backward) and correct gradients.
    branch_grad, gate_grad = branch.clone().requires_grad_(), gate.clone().requires_grad_()
    out = scale_and_add(identity, branch_grad, gate_grad)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(gate_grad.grad, branch.sum((2, 3), keepdim=True))
    # Inference: the same values, written over the branch (no new activation buffer).
    with torch.no_grad():
        out = scale_and_add(identity, branch, gate)
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() == branch.data_ptr()


def test_inference_squeeze_from_the_conv3_input_equals_pooling_the_branch() -> None:
    torch.manual_seed(0)
    block = Bottleneck(64, 32, 32, 128, se_reduction=16)
    for bn in (block.bn2, block.bn3):  # non-trivial statistics, so the BN algebra is exercised
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    hidden = torch.rand(2, 32, 9, 9)
    assert block.squeeze(block.bn3(block.conv3(hidden)), hidden) is None  # training: BN uses batch stats
    block.eval()
    with torch.no_grad():
        branch = block.bn3(block.conv3(hidden))
        torch.testing.assert_close(block.squeeze(branch, hidden), branch.mean((2, 3)), rtol=1e-5, atol=1e-5)
        tiny = hidden[:1, :, :2, :2]  # 4 positions: re-reading conv3's weights would cost more than it saves
        assert block.squeeze(block.bn3(block.conv3(tiny)), tiny) is None


def test_se_hidden_width_is_channels_over_r() -> None:
    assert SqueezeExcitation(2048, 16).reduce.out_features == 128  # C/r, not NVIDIA's fixed 16
    model = _meta_model("se_resnet50")
    assert [stage[0].se.reduce.out_features for stage in model.stages] == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="reduction=32"):
        SqueezeExcitation(16, reduction=32)


def test_plain_models_have_no_se() -> None:
    assert not any(isinstance(m, SqueezeExcitation) for m in _meta_model("resnet50").modules())
    inception = _meta_model("se_bn_inception")
    assert sum(isinstance(m, SqueezeExcitation) for m in inception.modules()) == 10  # one per module


# --- architecture details ----------------------------------------------------------------------------


def test_caffe_resnets_stride_on_first_1x1_and_v15_override_moves_it() -> None:
    block = _meta_model("se_resnet50").stages[1][0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    block = _meta_model("se_resnet50", stride_in_1x1=False).stages[1][0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    block = _meta_model("se_resnext50_32x4d").stages[1][0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_senet154_layout() -> None:
    model = _meta_model("senet154")
    convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((3, 3), 64), ((3, 3), 64), ((3, 3), 128)]
    first = model.stages[0][0]
    assert (first.conv1.out_channels, first.conv2.out_channels, first.conv2.groups) == (128, 256, 64)
    assert first.shortcut[0].kernel_size == (1, 1)  # stage 1's projection is 1x1 in the release
    for stage in model.stages[1:]:
        assert stage[0].shortcut[0].kernel_size == (3, 3) and stage[0].shortcut[0].stride == (2, 2)
    assert [len(s) for s in model.stages] == [3, 8, 36, 3] and model.dropout.p == 0.2


def test_zero_init_last_bn_makes_a_fresh_block_the_identity() -> None:
    torch.manual_seed(0)
    model = create_model("se_resnet_tiny", depths=(2, 1, 1, 1), zero_init_last_bn=True).eval()
    assert all(not m.bn3.weight.any() for m in model.modules() if isinstance(m, Bottleneck))
    block = [m for m in model.stages[0] if isinstance(m, Bottleneck)][1]  # no projection: output = input
    x = torch.rand(2, 64, 8, 8)  # non-negative, like every block input after a ReLU
    torch.testing.assert_close(block(x), x)


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    reference = create_model("se_resnext_tiny", num_classes=5).eval()
    fast = create_model("se_resnext_tiny", num_classes=5, channels_last=True).eval()
    fast.load_state_dict(reference.state_dict())
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)


def test_dropout_override() -> None:
    assert _meta_model("se_resnet50", dropout=0.5).dropout.p == 0.5
    with pytest.raises(ValueError, match="dropout"):
        create_model("se_resnet_tiny", dropout=1.5)


# --- registry ----------------------------------------------------------------------------------------


def test_registry_names() -> None:
    expected = {
        "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x4d",
        "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d",
        "senet154", "bn_inception", "se_bn_inception", "se_resnext_tiny", "se_resnet_tiny",
    }  # fmt: skip
    assert set(list_models()) == expected and list_models() == sorted(expected)


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'se_resnext50'") as err:
        create_model("se_resnext50")
    assert all(name in str(err.value) for name in list_models())


def test_unknown_override_is_refused_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="'stride_in_3x3'.*accepted: .*stride_in_1x1"):
        create_model("se_resnet50", stride_in_3x3=True)
    with pytest.raises(ValueError, match="'zero_init_last_bn' for model 'bn_inception'"):
        create_model("bn_inception", zero_init_last_bn=True)
    assert "channels_last" in model_options("bn_inception")


# --- complexity report -------------------------------------------------------------------------------


def test_complexity_report_shape_and_table() -> None:
    report = complexity_report("se_resnet_tiny", baseline="se_resnext_tiny", input_size=64, repeats=2)
    assert set(report) == {"model", "baseline", "latency_ratio"}
    for row in (report["model"], report["baseline"]):
        assert set(row) == {"name", "params", "macs", "latency_ms"} and row["latency_ms"] > 0
    assert report["model"]["params"] == count_params(create_model("se_resnet_tiny"))
    assert report["latency_ratio"] == pytest.approx(report["model"]["latency_ms"] / report["baseline"]["latency_ms"])
    table = format_table(report)
    assert "se_resnet_tiny" in table and "se_resnext_tiny" in table and "GFLOPs" in table
    alone = complexity_report("se_resnet_tiny", input_size=64, repeats=1)
    assert alone["baseline"] is None and alone["latency_ratio"] is None and "se_resnet_tiny" in format_table(alone)


def test_measure_latency_interleaves_and_rejects_bad_input() -> None:
    models = {"a": create_model("se_resnet_tiny"), "b": create_model("se_resnext_tiny")}
    latency = measure_latency(models, 32, "cpu", repeats=3, warmup=1)
    assert set(latency) == {"a", "b"} and all(v > 0 for v in latency.values())
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        measure_latency(models, 32, "tpu", repeats=1)
