"""The DALI graphs on crafted images: each augmentation verifiably applied, and absent when off.

Real DALI on the CPU, real JPEG files. Images are tiny so that the whole file runs in seconds.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, LUMA, AugmentSpec, colour_transform, draw, warp_geometry
from pipeline.dali import image_size, looks_complete
from pipeline.datasets import ImageIndex
from pipeline.loader import TrainLoader
from tests.helpers import eval_loader, train_spec

SIZE = 64  # output side
OFF = AugmentSpec.off()


def _crafted(size: int = 96) -> np.ndarray:
    """Asymmetric in x, y and colour: a red left band, a blue top band, a green dot right of centre."""
    img = np.full((size, size, 3), 128, np.uint8)
    img[:, : size // 4] = (200, 40, 40)
    img[: size // 6, :] = (40, 40, 200)
    c = size // 2
    img[c - 4:c + 4, c + 20:c + 28] = (40, 220, 40)
    return img


@pytest.fixture(scope="module")
def crafted_index(tmp_path_factory: pytest.TempPathFactory) -> ImageIndex:
    root = tmp_path_factory.mktemp("crafted")
    (root / "a").mkdir()
    files = []
    for n in range(4):
        Image.fromarray(_crafted()).save(root / "a" / f"img{n}.JPEG", quality=98)
        files.append(f"a/img{n}.JPEG")
    return ImageIndex(root, tuple(files), np.zeros(len(files), np.int64), ("a",))


def batch(index: ImageIndex, aug: AugmentSpec, seed: int = 0, layout: str = "NHWC") -> np.ndarray:
    """The first batch of 4, denormalised to 0-255 floats (B, H, W, C)."""
    spec = train_spec(batch_size=4, seed=seed, sampling="shuffle", aug=aug, crop_size=SIZE, dtype="float32",
                      layout=layout, prefetch=1)
    with TrainLoader(index, spec) as loader:
        images, labels = next(iter(loader))
    assert labels.dtype == torch.int64
    x = images.numpy()
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    return x * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)


def test_no_augmentation_is_a_plain_resize(crafted_index: ImageIndex) -> None:
    out = batch(crafted_index, OFF)
    ref = np.asarray(Image.fromarray(_crafted()).resize((SIZE, SIZE), Image.BILINEAR), np.float32)
    assert out.shape == (4, SIZE, SIZE, 3)
    assert np.abs(out - ref).mean() < 6  # JPEG + a different bilinear kernel; not a flip, not a colour change
    assert out[:, :, : SIZE // 5, 0].mean() > 170 and out[:, :, -SIZE // 5:, 0].mean() < 150  # red stays left


def test_flip_mirrors_and_is_absent_when_off(crafted_index: ImageIndex) -> None:
    plain, flipped = batch(crafted_index, OFF), batch(crafted_index, replace(OFF, flip=1.0))
    np.testing.assert_allclose(flipped, plain[:, :, ::-1], atol=1.0)


def test_layouts_agree(crafted_index: ImageIndex) -> None:
    np.testing.assert_allclose(batch(crafted_index, OFF, layout="NCHW"), batch(crafted_index, OFF), atol=1e-3)


def test_rotation_turns_counter_clockwise_by_the_drawn_angle(crafted_index: ImageIndex) -> None:
    aug = replace(OFF, rotation=30.0)
    out = batch(crafted_index, aug, seed=3)
    plain = batch(crafted_index, OFF, seed=3)
    assert np.abs(out - plain).mean() > 5  # rotated
    for k in range(4):
        angle = draw(aug, 3, 0, k, 96, 96).angle
        green = (out[k, :, :, 1] > 170) & (out[k, :, :, 0] < 110)
        ys, xs = np.nonzero(green)
        c = (SIZE - 1) / 2
        seen = np.degrees(np.arctan2(-(ys.mean() - c), xs.mean() - c))  # screen angle, y up
        assert abs(seen - angle) < 4, (k, seen, angle)
    assert np.array_equal(batch(crafted_index, replace(OFF, rotation=0.0), seed=3), plain)


def test_colour_jitter_is_the_fused_colour_matrix(crafted_index: ImageIndex) -> None:
    aug = replace(OFF, brightness=0.4, contrast=0.4, saturation=0.6, hue=0.1)
    plain, out = batch(crafted_index, OFF, seed=5), batch(crafted_index, aug, seed=5)
    assert np.abs(out - plain).mean() > 5
    for k in range(4):
        d = draw(aug, 5, 0, k, 96, 96)
        m, t0, v = colour_transform(d)
        gray_mean = float((plain[k] @ LUMA).mean())
        expected = plain[k] @ m.T + t0 + v * gray_mean  # normalised
        got = (out[k] - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
        np.testing.assert_allclose(got, expected, atol=2e-3)
    assert np.array_equal(batch(crafted_index, replace(aug, brightness=0, contrast=0, saturation=0, hue=0), seed=5),
                          plain)


def test_saturation_and_hue_keep_gray_gray() -> None:
    d = draw(AugmentSpec(saturation=0.9, hue=0.4, brightness=0, contrast=0), 1, 0, 0, 100, 100)
    m, t0, v = colour_transform(d, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_allclose(m @ np.full(3, 77.0), np.full(3, 77.0), rtol=1e-5)


def test_crop_boxes_follow_random_resized_crop() -> None:
    spec = AugmentSpec()
    for p in range(300):
        w, h = 300 + p % 7 * 40, 200 + p % 5 * 60
        d = draw(spec, 0, 0, p, w, h)
        assert 0 <= d.x and d.x + d.w <= w and 0 <= d.y and d.y + d.h <= h
        assert 0.08 * w * h * 0.9 <= d.w * d.h <= w * h
        g = warp_geometry(d, w, h, 224)
        anchor, shape = g["anchor"], g["shape"]
        assert (anchor >= 0).all() and anchor[0] + shape[0] <= h and anchor[1] + shape[1] <= w
        assert bool(g["prescale"]) == (max(d.w, d.h) > 2 * 224)
    fallback = draw(replace(spec, min_area=1.0, max_area=1.0), 0, 0, 0, 400, 100)  # no 4:3 crop fits
    assert (fallback.w, fallback.h) == (133, 100) and fallback.x == (400 - 133) // 2
    assert draw(spec, 0, 1, 7, 500, 375) == draw(spec, 0, 1, 7, 500, 375) != draw(spec, 0, 2, 7, 500, 375)


def test_large_shrink_is_antialiased(tmp_path: Path) -> None:
    """A crop 8x the output: the warp alone would point-sample noise; the pre-resize averages it."""
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(noise).save(tmp_path / "a" / "noise.JPEG", quality=95)
    index = ImageIndex(tmp_path, ("a/noise.JPEG",) * 4, np.zeros(4, np.int64), ("a",))
    out = batch(index, OFF)
    assert out.std() < 0.25 * noise.std()
    assert abs(out.mean() - noise.mean()) < 4


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="min_area"):
        AugmentSpec(min_area=0.5, max_area=0.2)
    with pytest.raises(ValueError, match="hue"):
        AugmentSpec(hue=0.7)


def test_image_header_and_byte_screen() -> None:
    img = Image.fromarray(_crafted(40)[:, :30])
    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
        buf = io.BytesIO()
        img.convert(mode).save(buf, format=fmt)
        data = buf.getvalue()
        assert image_size(data) == (30, 40) and looks_complete(data), (mode, fmt)
        assert not looks_complete(data[: len(data) * 3 // 5])
    assert not looks_complete(b"") and image_size(b"") is None


def test_eval_centre_and_ten_crop(crafted_index: ImageIndex) -> None:
    kw = dict(batch_size=3, crop_size=SIZE)
    with eval_loader(crafted_index, **kw) as loader:
        got = [(x.shape, p.tolist()) for x, _, p in loader]
    assert got == [((3, 3, SIZE, SIZE), [0, 1, 2]), ((1, 3, SIZE, SIZE), [3])]
    with eval_loader(crafted_index, ten_crop=True, **kw) as loader:
        x, labels, _ = next(iter(loader))
    assert x.shape == (3, 10, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 0]
    np.testing.assert_allclose(x[:, 5:].numpy(), x[:, :5].flip(-1).numpy(), atol=1e-5)  # mirrors of the five



def test_a_sample_gets_the_same_draw_alone_and_in_any_batch() -> None:
    """Resume, another world size or another batch size put a position into another batch: same numbers."""
    from pipeline.dali import sample_params

    spec = AugmentSpec(hue=0.1)
    positions = np.arange(500, 564)
    widths, heights = 200 + positions % 300, 150 + positions % 211
    whole = sample_params(spec, 7, 3, positions, widths, heights, 224)
    parts = np.concatenate([sample_params(spec, 7, 3, positions[i:i + 5], widths[i:i + 5], heights[i:i + 5], 224)
                            for i in range(0, 64, 5)])
    assert np.array_equal(whole, parts)
    single = draw(spec, 7, 3, 530, int(widths[30]), int(heights[30]))
    g = warp_geometry(single, int(widths[30]), int(heights[30]), 224)
    assert np.array_equal(g["matrix"].ravel(), whole[30, 7:13]) and np.array_equal(g["anchor"], whole[30, 0:2])


def _graph(pipe) -> tuple[list, list]:
    """The operators of a pipeline's Python graph (built without a device) and its outputs."""
    pipe._build_graph()  # DALI offers no public graph walk that works without a GPU
    return pipe._ops, pipe._graph_outputs


def _ops(ops: list, suffix: str) -> list:
    return [op for op in ops if op._op._operator_name().endswith(suffix)]


def test_gpu_graphs_put_the_decoder_on_mixed_the_pixels_on_gpu_and_arguments_on_the_cpu() -> None:
    """The GPU training and eval graphs, constructed on this CPU machine (device_id=0; not buildable here)."""
    from pipeline.dali import EvalSource, TrainSource, decoder_options, eval_pipeline, pipeline_args, train_pipeline
    from pipeline.input_spec import EvalInput, Runtime
    from pipeline.sampling import ClassAwareSampler

    labels = np.array([0, 1, 0, 1])
    spec = train_spec(batch_size=2, crop_size=64, device="gpu", device_id=0, threads=4, py_workers=1)
    source = TrainSource("/nowhere", ("a",) * 4, labels, (ClassAwareSampler(labels, 1, 0, 0),), spec, 0, 0)
    train = train_pipeline(source=source, runtime=spec.runtime, **pipeline_args(2, spec.runtime))
    ops, outputs = _graph(train)
    assert [(o.device) for o in outputs] == ["gpu", "gpu", "gpu", "cpu"]  # images, labels, colour; ids on the host
    (decoder,) = _ops(ops, "decoders.image_slice")
    assert decoder._op.device == "mixed"
    # Chroma upsampled as libjpeg-turbo (the CPU decoder) does; DALI refuses an unknown argument when the
    # graph is defined, so the name is checked here, not first on a GPU.
    assert decoder_options("gpu", 4)["jpeg_fancy_upsampling"] is True
    assert [d for d in (decoder.spec.InputDevice(i) for i in range(decoder.spec.NumInput()))] == ["cpu"] * 3
    pixel_ops = _ops(ops, ".resize") + _ops(ops, ".warp_affine") + _ops(ops, "_conditional.merge")
    assert len(pixel_ops) == 3 and all(op._op.device == "gpu" for op in pixel_ops)
    for op in ops:  # argument inputs (after the regular ones) are always host data
        s = op.spec
        assert all(s.InputDevice(i) == "cpu" for i in range(s.NumRegularInput(), s.NumInput())), op._op._operator_name()
        if op._op.device == "cpu":  # the host part of the graph only slices the per-sample argument rows
            assert op._op._operator_name().rsplit(".", 1)[-1] in {"external_source", "_tensor_subscript", "cast",
                                                                  "reshape", "gt", "split"}, op._op._operator_name()

    ev = EvalInput(batch_size=2, crop_size=64, ten_crop=True, dtype="float16",
                   runtime=Runtime(device="gpu", device_id=0, threads=4))
    evaluate = eval_pipeline(source=EvalSource("/nowhere", ("a",) * 4, labels, np.arange(4), 2), spec=ev,
                             **pipeline_args(2, ev.runtime))
    ops, outputs = _graph(evaluate)
    assert [o.device for o in outputs] == ["gpu", "gpu", "cpu"]
    (decoder,) = _ops(ops, "decoders.image")
    assert decoder._op.device == "mixed" and decoder.spec.InputDevice(0) == "cpu"
    normalize = _ops(ops, "crop_mirror_normalize")
    assert len(normalize) == 10 and all(op._op.device == "gpu" for op in normalize + _ops(ops, ".resize"))
    assert all(op._op.device == "gpu" for op in _ops(ops, ".stack"))
