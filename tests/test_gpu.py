"""The GPU path: DALI's mixed decoder and GPU graph (and its chroma against the CPU decoder's), bad files
on the device (cut inside the scan data; killing the decoder), the loader's process handling once CUDA
is up, a step without host synchronisation, checkpoint and resume on the device.

Marked `gpu` and skipped where no GPU is visible (counted through NVML, which does not initialise the
CUDA driver: an `is_available()` here would make every later loader test in this process unable to
fork). `SENET_TEST_DEVICE=cpu` runs the same tests on the CPU device; `make gpu-check DEVICE=cpu` does
that, so the check script itself is tested on machines without a GPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import ImageIndex, index_train, index_val
from pipeline.devkit import load_devkit
from pipeline.loader import TrainLoader
from pipeline.processes import start_method
from pipeline.dali import HW_DECODER_LOAD, decoder_options
from tests.helpers import (LOADER_CROP as CROP, CheckpointRecorder, bogus_huffman_table, cut_inside_the_scan, eval_loader,
                           planted, train_loader, tree_with_a_broken_file)
from training.placement import gpu_count

DEVICE = os.environ.get("SENET_TEST_DEVICE", "gpu")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "gpu" and gpu_count() == 0,
                                                  reason="needs a CUDA device (SENET_TEST_DEVICE=cpu runs these on the CPU)")]


def loader(index: ImageIndex, device: str = DEVICE, **kw) -> TrainLoader:
    return train_loader(index, **{"device": device, "device_id": 0 if device == "gpu" else None, "threads": 2,
                                  "py_workers": 1, **kw})


def test_device_loader_matches_the_cpu_loader_on_the_same_draws(clean) -> None:
    """Mixed decode + GPU warp + colour on the GPU: the CPU path's batches within decoder differences."""
    index, bad = clean
    with loader(index, exclude=bad) as g:
        xg, yg = next(iter(g))
    with loader(index, device="cpu", exclude=bad) as c:
        xc, yc = next(iter(c))
    assert xg.device.type == ("cuda" if DEVICE == "gpu" else "cpu") and yg.device == xg.device
    assert xg.dtype == torch.float16 and yg.dtype == torch.int64 and xg.shape == xc.shape
    assert torch.equal(yg.cpu(), yc)
    assert (xg.float().cpu() - xc.float()).abs().mean() < 0.1  # normalised units: a few grey levels


def test_the_mixed_decoder_upsamples_chroma_as_the_cpu_decoder_does(small_tree: Path) -> None:
    """The training decoder's options bring nvJPEG's output closer to libjpeg-turbo's (the CPU path) than
    nvJPEG's default chroma upsampling does, with and without the hardware decoder taking its share."""
    if DEVICE != "gpu":
        pytest.skip("the mixed decoder exists on a GPU only")
    from nvidia.dali import fn, pipeline_def, types

    index = index_train(small_tree)
    bad = planted(small_tree, "truncated", "zero_bytes", "png_as_jpeg", "cmyk", "grayscale")
    jpegs = [np.frombuffer(index.read(i), np.uint8) for i, f in enumerate(index.files) if f not in bad][:16]

    def decoded(decoder: dict) -> list[np.ndarray]:
        @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=0)
        def decode():
            data = fn.external_source(source=lambda: jpegs, batch=True)
            return fn.decoders.image(data, output_type=types.RGB, **decoder)

        pipe = decode()
        pipe.build()
        (out,) = pipe.run()
        out = out.as_cpu() if hasattr(out, "as_cpu") else out
        return [np.asarray(out[i], np.float32) for i in range(len(jpegs))]

    cpu = decoded({"device": "cpu"})  # libjpeg-turbo, accurate IDCT
    for load in (0.0, HW_DECODER_LOAD):
        ours = decoder_options("gpu", 2, load)
        apart = {fancy: np.mean([np.abs(g - c).mean() for g, c in zip(decoded({**ours, "jpeg_fancy_upsampling": fancy}),
                                                                            cpu)])
                 for fancy in (True, False)}
        assert ours["jpeg_fancy_upsampling"] and apart[True] < apart[False], (load, apart)


def test_ten_crop_eval_on_the_device_covers_every_image_once(small_tree: Path) -> None:
    train = index_train(small_tree)
    val = index_val(small_tree, load_devkit(small_tree / "ILSVRC2012_devkit_t12"), train.classes)
    seen = []
    for rank in range(2):
        with eval_loader(val, rank=rank, world_size=2, device=DEVICE, device_id=0 if DEVICE == "gpu" else None,
                         ten_crop=True, threads=2, py_workers=1) as ev:
            for images, labels, positions in ev:
                assert images.shape[1:] == (10, 3, CROP, CROP) and labels.device == images.device
                assert images.device.type == ("cuda" if DEVICE == "gpu" else "cpu")
                seen += positions.tolist()
    assert seen == list(range(len(val)))


def test_a_file_cut_inside_its_scan_data_is_replaced_on_the_device_before_any_decoder_sees_it(
        small_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The usual damage (an interrupted copy): the file ends inside its entropy-coded segment, every header is
    whole. The byte screen on the host catches it, so what the hardware decoder would make of a cut stream
    never matters: training replaces it by a sample of its class, evaluation scores it as a blank image."""
    index, victim = tree_with_a_broken_file(small_tree, tmp_path / "tree", cut_inside_the_scan)
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with loader(index, sampling="shuffle", batch_size=2) as run:
            n = sum(len(y) for _, y in run)
            stats = dict(run.stats)
        with eval_loader(index, batch_size=4, device=DEVICE, device_id=0 if DEVICE == "gpu" else None, threads=2,
                         py_workers=1) as ev:
            scored = sum(len(y) for _, y, _ in ev)
            blank = list(ev.stats["bad_files"])
    assert n == len(index) // 2 * 2 and scored == len(index)
    assert stats["rebuilds"] == 0 and stats["bad_files"] == [victim] and stats["replaced_samples"] == 1
    assert blank == [victim] and victim in caplog.text


def test_a_file_that_kills_the_device_pipeline_is_replaced_after_a_rebuild_with_spawned_workers(
        small_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first build initialised the CUDA driver (on a GPU), so the rebuilt pipeline spawns its workers.

    The bogus Huffman table passes the byte screen; nvJPEG's CUDA decoder and libjpeg-turbo refuse it. The
    hardware decoder is left out (hw_decoder_load 0): whether it refuses every such stream is not ours to
    promise, and check-data screens a data set with a full decode before training.
    """
    index, victim = tree_with_a_broken_file(small_tree, tmp_path / "tree", bogus_huffman_table)
    with caplog.at_level(logging.WARNING, logger="senet.input"):
        with loader(index, sampling="shuffle", batch_size=2, hw_decoder_load=0.0) as run:
            n = sum(len(y) for _, y in run)
            stats = dict(run.stats)
            method = start_method()
    assert method == ("spawn" if DEVICE == "gpu" else "fork")
    assert n == len(index) // 2 * 2
    assert stats["rebuilds"] == 1 and stats["bad_files"] == [victim] and stats["replaced_samples"] == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_step_does_not_synchronise_the_host(clean, precision: str) -> None:
    """After warm-up, `next(loader)` and the engine's step raise nothing under sync-debug mode 'error'."""
    if DEVICE != "gpu":
        pytest.skip("host synchronisation is a CUDA matter")
    from models import create_model
    from training.config import OptimConfig
    from training.engine import StepMeter, prepare_batch, train_step
    from training.optim import build_optimizer
    from training.precision import resolve_precision

    index, bad = clean
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    prec = resolve_precision(precision, "gpu")
    model = create_model("se_resnext_tiny", num_classes=len(index.classes), channels_last=True).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer, kind = build_optimizer(model, OptimConfig(), "gpu")
    scaler, meter = prec.grad_scaler(), StepMeter(device, 6)
    with loader(index, exclude=bad, layout="NHWC", samples_per_epoch=6 * 40) as run:
        batches = iter(run)
        for step in range(12):
            if step == 8:  # warmed up: allocator, cudnn's kernel choice, DALI's buffers
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                images, labels = prepare_batch(*next(batches), prec, "NHWC")
                meter.add(train_step(model, images, labels, optimizer, scaler, prec, 0.1))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert kind == "torch fused" or kind == "apex FusedSGD"
    meter.check_finite(12, None)


def test_a_run_on_the_device_stops_checkpoints_and_resumes(small_tree: Path, tmp_path: Path) -> None:
    """The engine on the device: a requested stop mid-epoch, then a resume that finishes the run."""
    from training import engine
    from training.config import load_config
    from training.ranks import DistInfo
    from training.placement import place_run

    sets = [f"data.root={small_tree}", "model.arch=se_resnext_tiny", "model.num_classes=6", f"train.device={DEVICE}",
            "train.precision=auto" if DEVICE == "gpu" else "train.precision=fp32", "data.crop_size=32",
            "data.py_workers=1", "data.threads=2", "train.batch_size=8", "train.epochs=2", "train.log_every=2",
            "train.checkpoint_every=100", f"data.cache_dir={tmp_path / 'cache'}", "data.samples_per_epoch=64"]
    cfg = load_config(None, sets)

    control = CheckpointRecorder()
    control.request_checkpoint(stop=True)  # at the first agreement: step 1
    threads = torch.get_num_threads()
    try:
        part = engine.run(cfg, place_run(cfg, DistInfo()), tmp_path / "run", resume="auto", control=control)
        assert part["stopped"] and part["step"] == 1 and control.saved == [1]
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["mid_epoch"] and ckpt["loader"]["global_position"] == 8
        rest = engine.run(cfg, place_run(cfg, DistInfo()), tmp_path / "run", resume="auto")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert rest["step"] == 16 and not rest["stopped"] and np.isfinite(rest["val_top1"])
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert final["step"] == 16 and all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
