"""DALI graphs: one @pipeline_def per purpose (train, eval), the pieces they share, and the Python
sources that feed them.

Train: a parallel external_source calls `TrainSource` once per BATCH (in DALI's Python workers): it
reads this rank's files in sampler order, screens the bytes, reads each image's size from its
header and draws the whole batch's augmentation on the host with vectorised numpy
(pipeline.augment), packing each sample's small arguments into one float32 row (`PARAMS`). The graph
slices that row into per-sample arguments and only executes them:

    bytes -> decode only the needed region (image_slice) -> [antialiased resize, only for the few
    samples the warp would shrink by > 2x] -> ONE warp_affine (crop + scale + rotate + flip) to
    float HWC of the sample's output size;  per sample also the colour matrix [M | t0 | v] (3 x 5)
    and the label

Everything the source and the graph need to know comes from one spec (`pipeline.input_spec`): the
output size of an epoch (`TrainInput.crop_size`) is drawn into each sample's row beside its warp
matrix, so a size that changes per epoch (progressive resizing) needs no other graph.

and the loader applies brightness, contrast, saturation, hue, the normalisation, the layout and the
dtype as ONE batched matrix product after the iterator (pipeline.loader.apply_colour). On the GPU the
decoder is `mixed` (nvJPEG, with the hardware JPEG decoder where the GPU has one), everything after it
runs on the GPU, and the label and colour matrix travel to the GPU inside the pipeline, ahead of time.

Why batches and one packed row: per sample, a Python callback and each extra external_source output
cost host time that does not shrink with more GPUs. Why these operators and not the textbook ones
(warp_affine to float with clamped borders instead of resize + rotate, the colour pass after the
iterator instead of coord_transform or color_twist, the fast IDCT): each was chosen by its measured
cost per image, in benchmarks/RESULTS_input.md ("Where the time goes").

Eval: decode -> resize the short side to crop/ratio (antialiased) -> centre crop, or ten crops (4
corners + centre, and their mirrors), normalised.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, colour_params, draws, warp_geometries
from pipeline.input_spec import HW_DECODER_LOAD, EvalInput, Runtime, TrainInput
from pipeline.processes import become_worker_of, start_method

DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}
LAYOUTS = {"NCHW": "CHW", "NHWC": "HWC"}
# nvJPEG preallocates, per decoder thread, two pinned host buffers (double buffering) and one device
# buffer of these paddings. A rank has two decoding pipelines (train and eval): their pinned memory
# stays within PINNED_BUDGET (8 threads of a 10-core task: 2 x 2 x 8 x 32 MiB = 1 GiB; NVIDIA's
# ImageNet examples pad 134 MiB per buffer, 4.5 GB per rank). An image larger than the padding still
# decodes; nvJPEG then grows the buffer once.
DECODING_PIPELINES = 2
PINNED_BUDGET = 1 << 30
DEVICE_BUDGET = 1 << 30
HOST_PADDING_RANGE = (8 << 20, 134 << 20)  # DALI's default .. NVIDIA's ImageNet example
DEVICE_PADDING_RANGE = (16 << 20, 201 << 20)

# Columns of the per-sample float32 row that TrainSource packs and `unpack_params` slices in the graph.
# Integers below 2**24 (pixel coordinates) are exact in float32.
# out_size: the warp's output side (h, w) of the sample's epoch (`TrainInput.crop_size`), drawn with its matrix.
PARAMS = {"anchor": (0, 2), "shape": (2, 4), "prescale": (4, 5), "pre_size": (5, 7), "matrix": (7, 13),
          "colour": (13, 28), "size": (28, 30), "flip": (30, 31), "out_size": (31, 33)}
PARAM_COLUMNS = 33
# Columns of the per-sample int64 row of both sources.
# replaced: the bad file's dataset index, else -1; read_ns: nanoseconds the source spent reading the sample's
# bytes (in a Python worker, or in the loader's process without workers): what the stall alarm calls file reads.
TRAIN_IDS = ("label", "replaced", "position", "read_ns")
EVAL_IDS = ("label", "position", "bad")


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


def decoder_options(device: str, threads: int, hw_decoder_load: float = HW_DECODER_LOAD) -> dict[str, Any]:
    """Decoder arguments for 'cpu' or 'gpu' (mixed) with `threads` DALI threads.

    On the GPU `hw_decoder_load` is always passed (DALI uses it only where a hardware decoder exists),
    the nvJPEG paddings are sized to the pinned and device budgets, and thread pinning is off: DALI
    would pin its decoder threads to the GPU's NVML CPU set, the same cores for every rank of a node,
    ignoring the task's own CPU binding.
    """
    # libjpeg-turbo's fast integer IDCT: faster decoding on the CPU (benchmarks/RESULTS_input.md), errors
    # of a grey level or two at ImageNet's JPEG qualities, far below the colour jitter's changes.
    if device != "gpu":
        return {"device": "cpu", "use_fast_idct": True}
    per_thread = DECODING_PIPELINES * max(1, threads)
    host = int(np.clip(PINNED_BUDGET // (2 * per_thread), *HOST_PADDING_RANGE))
    dev = int(np.clip(DEVICE_BUDGET // per_thread, *DEVICE_PADDING_RANGE))
    # jpeg_fancy_upsampling: nvJPEG interpolates the subsampled chroma planes as libjpeg-turbo (the CPU
    # decoder) does by default, instead of replicating them; without it the two decoders differ at every
    # colour edge, and the GPU would train on other pixels than the CPU path and the tests compare.
    return {"device": "mixed", "hw_decoder_load": float(hw_decoder_load), "use_fast_idct": True, "affine": False,
            "host_memory_padding": host, "device_memory_padding": dev, "jpeg_fancy_upsampling": True}


def pinned_decoder_bytes(decoder: dict[str, Any], threads: int) -> int:
    """Pinned host memory nvJPEG preallocates for one pipeline with these options (0 on the CPU)."""
    return 2 * max(1, threads) * int(decoder.get("host_memory_padding", 0)) if decoder.get("device") == "mixed" else 0


# ------------------------------------------------------------------------------------ sources
@dataclass
class TrainSource:
    """Batch callback of the training graph (runs in DALI's Python workers; picklable).

    A process reads one shard (rank) of the sample order, or several (the virtual ranks it hosts,
    `samplers`, one per shard): each batch is one shard's `batch_size` samples, and the shards take
    turns, so a step is len(samplers) batches in shard order. Batch `iteration` of DALI epoch j holds
    shard ``iteration % len(samplers)``'s samples ``k = (iteration // len(samplers)) * batch_size +
    (start if j == 0) ...`` of epoch ``first_epoch + j``, at global positions
    ``sampler.global_positions()[k]``, drawn for that epoch's crop size (`TrainInput.crop_size`); in DALI
    epoch 0 the first `skip` batches are left out (a pipeline rebuilt inside a step). Returns the JPEG
    bytes, the (B, PARAM_COLUMNS) float32 rows and the (B, 4) int64 `TRAIN_IDS` rows.
    """

    root: str
    files: Sequence[str]
    labels: np.ndarray
    samplers: Sequence[Any]  # pipeline.sampling samplers of this process's shards (pure: rank_indices, global_positions)
    spec: TrainInput  # batch size, seed, augmentation, crop size per epoch, normalisation
    first_epoch: int
    start: int  # samples of each shard already used in the first epoch
    bad: frozenset = frozenset()  # dataset indices known to be undecodable
    owner_pid: int = 0  # the loader's process; a worker is any other
    samples: Any = None  # a pack's PackedSamples: bytes by offset and sizes from its index; else files
    skip: int = 0  # batches of the first step already delivered (a rebuild inside a step)

    def __post_init__(self) -> None:
        self.owner_pid = self.owner_pid or os.getpid()
        self.samplers = tuple(self.samplers)

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def seed(self) -> int:
        return self.spec.seed

    def epoch_batches(self, dali_epoch: int) -> int:
        """Batches of DALI epoch j (every shard's whole batches), from the start point."""
        start = self.start if dali_epoch == 0 else 0
        skip = self.skip if dali_epoch == 0 else 0
        return (len(self.samplers[0]) - start) // self.batch_size * len(self.samplers) - skip

    def __call__(self, info: Any) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        become_worker_of(self.owner_pid)
        if info.iteration >= self.epoch_batches(info.epoch_idx):
            raise StopIteration
        epoch = self.first_epoch + info.epoch_idx
        first = info.epoch_idx == 0
        step, shard = divmod(info.iteration + (self.skip if first else 0), len(self.samplers))
        k = step * self.batch_size + (self.start if first else 0)
        sampler = self.samplers[shard]
        indices = sampler.rank_indices(epoch)[k:k + self.batch_size]
        positions = sampler.global_positions(k, k + self.batch_size)
        jpegs, sizes, replaced = [], np.empty((len(indices), 2), np.int64), np.full(len(indices), -1, np.int64)
        read_ns = np.empty(len(indices), np.int64)
        for j, (index, position) in enumerate(zip(indices.tolist(), positions.tolist())):
            start = time.perf_counter_ns()
            data, sizes[j], used = self._read(index, epoch, position)
            read_ns[j] = time.perf_counter_ns() - start
            jpegs.append(np.frombuffer(data, dtype=np.uint8))
            if used != index:
                replaced[j] = index
        spec = self.spec
        params = sample_params(spec.aug, spec.seed, epoch, positions, sizes[:, 0], sizes[:, 1], spec.crop_size(epoch),
                               spec.mean, spec.std)
        return jpegs, params, np.stack([self.labels[indices], replaced, positions, read_ns], axis=1)

    def _read(self, index: int, epoch: int, position: int) -> tuple[bytes, tuple[int, int], int]:
        """The file's bytes and size, or a same-class stand-in chosen by (seed, epoch, position)."""
        members = None
        for attempt in range(16):
            data = b""
            if index not in self.bad:
                with contextlib.suppress(OSError):  # a vanished or unreadable file is a bad file too
                    if self.samples is not None:
                        data = self.samples.read(index)
                    else:
                        with open(os.path.join(self.root, self.files[index]), "rb") as f:
                            data = f.read()
            if not looks_complete(data):
                size = None
            else:  # a pack's index holds the size the header gives: no parse
                size = self.samples.size(index) if self.samples is not None else image_size(data)
            if size is not None:
                return data, size, index
            if members is None:  # only for bad files: a scan of all labels
                members = np.flatnonzero(self.labels == self.labels[index])
            rng = np.random.default_rng((self.seed, epoch, position, 1 + attempt))
            index = int(members[rng.integers(len(members))])
        return _blank_jpeg(), (8, 8), -2  # a whole class of bad files: a blank image keeps the job alive


def sample_params(aug: AugmentSpec, seed: int, epoch: int, positions: np.ndarray, widths: np.ndarray,
                  heights: np.ndarray, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Each sample's augmentation as one float32 row of `PARAMS` columns (draws, warp geometry for an output of
    `crop_size`, colour)."""
    d = draws(aug, seed, epoch, positions, widths, heights)
    g = warp_geometries(d, widths, heights, crop_size)
    rows = np.empty((len(positions), PARAM_COLUMNS), np.float32)
    parts = {"anchor": g["anchor"], "shape": g["shape"], "prescale": g["prescale"][:, None],
             "pre_size": g["pre_size"], "matrix": g["matrix"].reshape(-1, 6),
             "colour": colour_params(d, mean, std).reshape(-1, 15), "size": np.stack([widths, heights], axis=1),
             "flip": d.flip[:, None], "out_size": np.full((len(positions), 2), crop_size)}
    for name, (lo, hi) in PARAMS.items():
        rows[:, lo:hi] = parts[name]
    return rows


@dataclass
class EvalSource:
    """Batch callback of the eval graph: this rank's contiguous slice of `positions`, in order.

    Returns the file bytes (a blank JPEG for an undecodable file) and (B, 3) int64 `EVAL_IDS` rows.
    """

    root: str
    files: Sequence[str]
    labels: np.ndarray
    positions: np.ndarray  # indices into files, this rank's shard
    batch_size: int
    samples: Any = None  # a pack's PackedSamples, else files under root

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __call__(self, info: Any) -> tuple[list[np.ndarray], np.ndarray]:
        it = info.iteration if hasattr(info, "iteration") else int(info)
        chunk = self.positions[it * self.batch_size:(it + 1) * self.batch_size]
        if it >= len(self) or not len(chunk):
            raise StopIteration
        jpegs, bad = [], np.zeros(len(chunk), np.int64)
        for j, p in enumerate(chunk.tolist()):
            data = self.samples.read(p) if self.samples is not None else Path(self.root, self.files[p]).read_bytes()
            ok = looks_complete(data) and image_size(data) is not None
            jpegs.append(np.frombuffer(data if ok else _blank_jpeg(), dtype=np.uint8))
            bad[j] = not ok
        return jpegs, np.stack([np.asarray(self.labels)[chunk], chunk, bad], axis=1).astype(np.int64)


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


# ------------------------------------------------------------------------------------ graph pieces
def unpack_params(params: Any) -> dict[str, Any]:
    """The per-sample arguments in a `PARAMS` row, as CPU DataNodes (argument inputs stay on the CPU)."""
    col = {name: params[lo:hi] for name, (lo, hi) in PARAMS.items()}
    return {"anchor": fn.cast(col["anchor"], dtype=types.INT32), "shape": fn.cast(col["shape"], dtype=types.INT32),
            "prescale": params[PARAMS["prescale"][0]] > 0.5, "pre_size": col["pre_size"],
            "matrix": fn.reshape(col["matrix"], shape=[2, 3]), "colour": fn.reshape(col["colour"], shape=[3, 5]),
            "mirror": fn.cast(params[PARAMS["flip"][0]], dtype=types.INT32), "out_size": col["out_size"]}


def decode_region(jpegs: Any, p: dict[str, Any], decoder: dict[str, Any]) -> Any:
    """Decode only the region a sample needs (libjpeg-turbo and nvJPEG skip the rest), RGB.

    EXIF orientation is ignored because the host measured the region in the stored (SOF) orientation.
    """
    return fn.decoders.image_slice(jpegs, p["anchor"], p["shape"], axis_names="HW", output_type=types.RGB,
                                   adjust_orientation=False, **decoder)


def normalize(images: Any, dtype: str, layout: str, mean=IMAGENET_MEAN, std=IMAGENET_STD, **crop: Any) -> Any:
    """Cast (and normalise, crop, mirror) to the output dtype and layout in one pass."""
    return fn.crop_mirror_normalize(images, dtype=DTYPES[dtype], output_layout=LAYOUTS[layout],
                                    mean=list(mean), std=list(std), **crop)


def on(device: str, node: Any) -> Any:
    """`node` moved to the GPU inside the pipeline (ahead of the consumer, no host sync later) on 'gpu'."""
    return node.gpu() if device == "gpu" else node


def source_depth(prefetch: int, py_workers: int) -> int:
    """Batches the parallel source computes ahead: enough to keep every Python worker busy."""
    return max(prefetch, py_workers, 1)


def source_args(runtime: Runtime) -> dict[str, Any]:
    """external_source's arguments for `runtime`: parallel with workers, and as many batches ahead as keep
    them busy (DALI's default is one: one busy worker; only parallel sources take the depth)."""
    if runtime.py_workers == 0:
        return {"parallel": False}
    return {"parallel": True, "prefetch_queue_depth": source_depth(runtime.prefetch, runtime.py_workers)}


def pipeline_args(batch_size: int, runtime: Runtime) -> dict[str, Any]:
    """The @pipeline_def arguments of a graph producing `batch_size` samples per batch as `runtime` says."""
    return {"batch_size": batch_size, "num_threads": runtime.threads, "prefetch_queue_depth": runtime.prefetch,
            "device_id": runtime.device_id if runtime.device == "gpu" else None,
            "py_num_workers": max(1, runtime.py_workers), "py_start_method": start_method()}


# ------------------------------------------------------------------------------------ graphs
@pipeline_def(enable_conditionals=True)
def train_pipeline(source: TrainSource, runtime: Runtime):
    """Training graph: warped float HWC images, labels and colour matrices (on the runtime's device), and the
    ids rows (CPU). Every size and draw comes from the source's spec, per sample."""
    jpegs, params, ids = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                            **source_args(runtime))
    p = unpack_params(params)
    images = decode_region(jpegs, p, decoder_options(runtime.device, runtime.threads, runtime.hw_decoder_load))
    if p["prescale"]:  # only the samples the warp would shrink by > 2x: antialias them first
        images = fn.resize(images, size=p["pre_size"], antialias=True)
    # Crop + scale + rotation + flip in one bilinear pass; float output and clamped borders are the
    # fast path of the CPU kernel. The output size is the sample's own argument, drawn with its matrix:
    # an epoch of another size needs no other graph.
    images = fn.warp_affine(images, matrix=p["matrix"], size=p["out_size"], dtype=types.FLOAT)
    return images, on(runtime.device, ids[0]), on(runtime.device, p["colour"]), ids


@pipeline_def
def eval_pipeline(source: EvalSource, spec: EvalInput):
    """Eval graph: short side to crop/ratio, centre crop or ten crops; outputs images and labels (on the
    runtime's device) and the ids rows (CPU)."""
    rt = spec.runtime
    jpegs, ids = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True, **source_args(rt))
    images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                               **decoder_options(rt.device, rt.threads, rt.hw_decoder_load))
    images = fn.resize(images, resize_shorter=float(spec.resize_shorter), antialias=True)
    crop = dict(crop=[spec.crop_size, spec.crop_size])
    dtype, layout, mean, std = spec.dtype, spec.layout, spec.mean, spec.std
    if not spec.ten_crop:
        images = normalize(images, dtype, layout, mean, std, crop_pos_x=0.5, crop_pos_y=0.5, **crop)
    else:  # 4 corners + centre, then the same mirrored: (10, C, H, W) per sample
        spots = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
        crops = [normalize(images, dtype, layout, mean, std, crop_pos_x=x, crop_pos_y=y, mirror=m, **crop)
                 for m in (0, 1) for x, y in spots]
        images = fn.stack(*crops, axis=0)
    return images, on(rt.device, ids[0]), ids
