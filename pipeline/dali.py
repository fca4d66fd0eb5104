"""DALI graphs: one @pipeline_def per purpose (train, eval) and the Python sources that feed them.

Train: a parallel external_source reads this rank's files in sampler order, screens the bytes, reads
the image size from the header and draws the sample's augmentation on the host (pipeline.augment),
so the graph only executes per-sample arguments:

    bytes -> decode only the needed region (image_slice) -> [antialiased resize, only for the few
    samples the warp would shrink by > 2x] -> ONE warp_affine (crop + scale + rotate + flip) to
    float HWC;  per sample also the packed colour matrix [M | t0 | v] (3 x 5)

and the loader applies brightness, contrast, saturation, hue, the normalisation, the layout and the
dtype as ONE batched matrix product after the iterator (pipeline.loader.apply_colour).

Measured on 2 CPU cores, one DALI thread, per image (benchmarks/RESULTS_input.md): warp_affine to
float with clamped borders ~0.7 ms (to uint8: 1.3 ms; a fill value costs ~25 % more); DALI's
coord_transform ~0.6 ms plus crop_mirror_normalize ~0.45 ms for the colour matrix and the fp16/CHW
cast, where torch's baddbmm over the batch does all of it in ~0.35 ms; color_twist ~1.2 ms; an
antialiased resize + crop_mirror_normalize (the crop_flip reference) ~1.7 ms.

Eval: decode -> resize the short side to crop/ratio (antialiased) -> centre crop, or ten crops (4
corners + centre, and their mirrors), normalised.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, colour_params, draw, warp_geometry

DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}
LAYOUTS = {"NCHW": "CHW", "NHWC": "HWC"}
# GPUs with a hardware JPEG decoder (nvJPEG's A100/H100 engine): give it 65 % of the images, as
# NVIDIA's DALI ResNet-50 example does; elsewhere the hybrid GPU decoder does all of them.
HW_DECODER_GPUS = ("A100", "A800", "A30", "H100", "H800", "H200", "GH200")
HW_DECODER_LOAD = 0.65
# nvJPEG scratch buffers preallocated per thread (values of NVIDIA's DALI ImageNet examples): large
# enough for ImageNet's biggest JPEGs, so no reallocation stalls the first epoch.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


# ------------------------------------------------------------------------------------ file bytes
def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker or a PNG's IHDR; None when neither parses."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame marker
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h) if w and h else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def looks_complete(data: bytes) -> bool:
    """Cheap screen for files that kill a DALI pipeline: empty, or cut before the end-of-image marker."""
    if data[:2] == b"\xff\xd8":
        return data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) != -1  # EOI near the end (trailing junk is ok)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in data[-64:]
    return False


def decoder_options(device: str, device_id: int | None) -> dict[str, Any]:
    """Decoder arguments: hw_decoder_load and nvJPEG memory padding by GPU model on 'gpu'."""
    # libjpeg-turbo's fast integer IDCT: ~25 % faster decoding on the CPU (measured here), errors of a
    # grey level or two at ImageNet's JPEG qualities, far below the colour jitter's changes.
    if device != "gpu":
        return {"device": "cpu", "use_fast_idct": True}
    name = gpu_name(device_id or 0)
    load = HW_DECODER_LOAD if any(k in name for k in HW_DECODER_GPUS) else 0.0
    return {"device": "mixed", "hw_decoder_load": load, "use_fast_idct": True, "device_memory_padding": DEVICE_MEMORY_PADDING,
            "host_memory_padding": HOST_MEMORY_PADDING}


def gpu_name(device_id: int) -> str:
    """The GPU's model name without creating a CUDA context here (workers may not be forked yet)."""
    import torch

    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(device_id)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    physical = ids[device_id] if device_id < len(ids) else str(device_id)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", physical],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------ sources
@dataclass
class TrainSource:
    """Per-sample callback of the training graph (runs in DALI's Python workers; picklable).

    Sample `idx_in_epoch` of DALI epoch j is this rank's sample ``k = idx + (start if j == 0)`` of
    epoch ``first_epoch + j``, at global position ``sampler.global_position(k)``.
    """

    root: str
    files: Sequence[str]
    labels: np.ndarray
    sampler: Any  # pipeline.sampling sampler (pure: rank_indices(epoch), global_position(k))
    aug: AugmentSpec
    crop_size: int
    seed: int
    first_epoch: int
    start: int
    batch_size: int
    bad: frozenset = frozenset()  # dataset indices known to be undecodable
    owner_pid: int = 0  # the loader's process; a worker is any other

    # The per-sample outputs, in order (train_pipeline names them).
    outputs = ("jpeg", "label", "anchor", "shape", "prescale", "pre_size", "matrix", "colour", "replaced", "position")

    def __post_init__(self) -> None:
        self.owner_pid = self.owner_pid or os.getpid()

    def epoch_samples(self, dali_epoch: int) -> int:
        """Samples of this rank in DALI epoch j: whole batches from the start point."""
        start = self.start if dali_epoch == 0 else 0
        return (len(self.sampler) - start) // self.batch_size * self.batch_size

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        _die_with_parent(self.owner_pid)
        if info.idx_in_epoch >= self.epoch_samples(info.epoch_idx):
            raise StopIteration
        epoch = self.first_epoch + info.epoch_idx
        k = info.idx_in_epoch + (self.start if info.epoch_idx == 0 else 0)
        index = int(self.sampler.rank_indices(epoch)[k])
        position = self.sampler.global_position(k)
        data, size, used = self._read(index, epoch, position)
        d = draw(self.aug, self.seed, epoch, position, *size)
        geometry = warp_geometry(d, *size, self.crop_size)
        return (np.frombuffer(data, dtype=np.uint8), np.array([self.labels[index]], np.int64), geometry["anchor"],
                geometry["shape"], geometry["prescale"], geometry["pre_size"], geometry["matrix"], colour_params(d),
                np.array([index if used != index else -1], np.int64), np.array([position], np.int64))

    def _read(self, index: int, epoch: int, position: int) -> tuple[bytes, tuple[int, int], int]:
        """The file's bytes and size, or a same-class stand-in chosen by (seed, epoch, position)."""
        members = None
        for attempt in range(16):
            data = b""
            if index not in self.bad:
                with contextlib.suppress(OSError):  # a vanished or unreadable file is a bad file too
                    with open(os.path.join(self.root, self.files[index]), "rb") as f:
                        data = f.read()
            size = image_size(data) if looks_complete(data) else None
            if size is not None:
                return data, size, index
            if members is None:  # only for bad files: a scan of all labels
                members = np.flatnonzero(self.labels == self.labels[index])
            rng = np.random.default_rng((self.seed, epoch, position, 1 + attempt))
            index = int(members[rng.integers(len(members))])
        return _blank_jpeg(), (8, 8), -2  # a whole class of bad files: a blank image keeps the job alive


@dataclass
class EvalSource:
    """Batch callback of the eval graph: this rank's contiguous slice of `positions`, in order."""

    root: str
    files: Sequence[str]
    labels: np.ndarray
    positions: np.ndarray  # indices into files, this rank's shard
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __call__(self, info: Any) -> tuple[list[np.ndarray], ...]:
        it = info.iteration if hasattr(info, "iteration") else int(info)
        chunk = self.positions[it * self.batch_size:(it + 1) * self.batch_size]
        if it >= len(self) or not len(chunk):
            raise StopIteration
        jpegs, labels, pos, bad = [], [], [], []
        for p in chunk.tolist():
            data = Path(self.root, self.files[p]).read_bytes()
            ok = looks_complete(data) and image_size(data) is not None
            jpegs.append(np.frombuffer(data if ok else _blank_jpeg(), dtype=np.uint8))
            labels.append(np.array([self.labels[p]], np.int64))
            pos.append(np.array([p], np.int64))
            bad.append(np.array([0 if ok else 1], np.int64))
        return jpegs, labels, pos, bad


_ARMED_PID = 0


def _die_with_parent(owner_pid: int) -> None:
    """In a worker process: ask Linux to kill it when the loader's process dies (no orphans)."""
    global _ARMED_PID
    pid = os.getpid()
    if pid == owner_pid or pid == _ARMED_PID:
        return
    _ARMED_PID = pid
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != owner_pid:  # the parent died before the signal was armed
        os._exit(1)


_BLANK: bytes | None = None


def _blank_jpeg() -> bytes:
    """A small mid-gray JPEG standing in for an image nothing can replace."""
    global _BLANK
    if _BLANK is None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (124, 116, 104)).save(buf, format="JPEG")
        _BLANK = buf.getvalue()
    return _BLANK


# ------------------------------------------------------------------------------------ graphs
def _normalize(images, dtype: str, layout: str, mean=IMAGENET_MEAN, std=IMAGENET_STD, **crop: Any):
    """Cast (and normalise, crop, mirror) to the output dtype and layout in one pass."""
    return fn.crop_mirror_normalize(images, dtype=DTYPES[dtype], output_layout=LAYOUTS[layout],
                                    mean=list(mean), std=list(std), **crop)


@pipeline_def(enable_conditionals=True)
def train_pipeline(source: TrainSource, decoder: dict[str, Any], crop_size: int, parallel: bool):
    """Training graph: warped float HWC images, labels, colour params, replaced (bad file or -1), positions."""
    nodes = fn.external_source(source=source, num_outputs=len(source.outputs), batch=False, parallel=parallel)
    x = dict(zip(source.outputs, nodes))
    # Decode only the region the warp reads (libjpeg-turbo and nvJPEG skip the rest); EXIF orientation
    # is ignored because the host measured the crop in the stored (SOF) orientation.
    images = fn.decoders.image_slice(x["jpeg"], x["anchor"], x["shape"], axis_names="HW", output_type=types.RGB,
                                     adjust_orientation=False, **decoder)
    if x["prescale"]:  # only the samples the warp would shrink by > 2x: antialias them first
        images = fn.resize(images, size=x["pre_size"], antialias=True)
    # Crop + scale + rotation + flip in one bilinear pass; float output and clamped borders are the
    # fast path of the CPU kernel.
    images = fn.warp_affine(images, matrix=x["matrix"], size=[crop_size, crop_size], dtype=types.FLOAT)
    return images, x["label"], x["colour"], x["replaced"], x["position"]


@pipeline_def
def eval_pipeline(source: EvalSource, decoder: dict[str, Any], crop_size: int, crop_ratio: float, ten_crop: bool,
                  dtype: str, layout: str, parallel: bool):
    """Eval graph: short side to crop/ratio, centre crop or ten crops; outputs images, labels, positions, bad."""
    jpegs, labels, positions, bad = fn.external_source(source=source, num_outputs=4, batch=True, batch_info=True,
                                                       parallel=parallel)
    images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decoder)
    images = fn.resize(images, resize_shorter=float(round(crop_size / crop_ratio)), antialias=True)
    crop = dict(crop=[crop_size, crop_size])
    if not ten_crop:
        images = _normalize(images, dtype, layout, crop_pos_x=0.5, crop_pos_y=0.5, **crop)
    else:  # 4 corners + centre, then the same mirrored: (10, C, H, W) per sample
        spots = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
        crops = [_normalize(images, dtype, layout, crop_pos_x=x, crop_pos_y=y, mirror=m, **crop)
                 for m in (0, 1) for x, y in spots]
        images = fn.stack(*crops, axis=0)
    return images, labels, positions, bad


def default_threads(py_workers: int) -> int:
    """DALI threads: this task's CPU share (SLURM_CPUS_PER_TASK or affinity) minus the Python workers."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return max(1, cpus - py_workers)
