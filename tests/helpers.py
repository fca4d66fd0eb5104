"""What several test modules share: small data specs, loader and cluster helpers, the demo recipe as a user runs it,
the engine's loop on resident tensors, and checkpoint damage as disks and copies do it.

Plain functions and constants, imported as `from tests.helpers import ...`; fixtures live in conftest.py.
Nothing here imports submitit, so every module that uses it collects in a bare interpreter.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from torch import nn

from pipeline.augment import AugmentSpec
from pipeline.datasets import ImageIndex, index_train
from pipeline.input_spec import CropSchedule, EvalInput, Runtime, TrainInput
from pipeline.loader import EvalLoader, ResidentLoader, TrainLoader
from pipeline.synthetic import SyntheticSpec
from training.build import Data, build
from training.config import Config, load_config
from training.control import RunControl
from training.engine import fit
from training.placement import place_run
from training.ranks import DistInfo

ROOT = Path(__file__).resolve().parents[1]

SMALL = SyntheticSpec(classes=6, train_per_class=12, val_per_class=4, test=8, imbalance=3.0, corrupt=5, seed=7,
                      min_side=64, max_side=160)


LOADER_CROP = 32


SHARD = ("rank", "world_size", "hosted", "exclude")


def _split(kw: dict) -> tuple[dict, dict, dict]:
    """Keywords of a loader helper split into the spec's fields, the runtime's and the shard's."""
    runtime = {k: kw.pop(k) for k in [f.name for f in fields(Runtime)] if k in kw}
    shard = {k: kw.pop(k) for k in SHARD if k in kw}
    return kw, runtime, shard


def train_spec(**kw) -> TrainInput:
    """A small CPU training spec (6 images of 32 px, class-aware, seed 11, fp16); keywords override its fields,
    `crop_size` a fixed size and the runtime's fields (threads, py_workers, prefetch, device, device_id)."""
    fields_, runtime, _ = _split(dict(kw))
    crop = CropSchedule(fields_.pop("crop_size")) if "crop_size" in fields_ else CropSchedule(LOADER_CROP)
    base = dict(batch_size=6, crop=crop, aug=AugmentSpec(), seed=11, sampling="class_aware", dtype="float16",
                layout="NCHW")
    return TrainInput(**{**base, **fields_}, runtime=Runtime(**{"threads": 1, "py_workers": 0, "prefetch": 2, **runtime}))


def train_loader(index: ImageIndex, **kw) -> TrainLoader:
    """A TrainLoader of `train_spec(**kw)`; `rank`, `world_size`, `hosted` and `exclude` shard it."""
    _, _, shard = _split(dict(kw))
    return TrainLoader(index, train_spec(**{k: v for k, v in kw.items() if k not in SHARD}), **shard)


def eval_loader(index: ImageIndex, **kw) -> EvalLoader:
    """A small CPU EvalLoader (32 px, float32, NCHW, batch 5); keywords override the spec's and the runtime's
    fields; `rank`, `world_size` and `exclude` shard it."""
    fields_, runtime, shard = _split(dict(kw))
    base = dict(batch_size=5, crop_size=LOADER_CROP, dtype="float32", layout="NCHW")
    spec = EvalInput(**{**base, **fields_}, runtime=Runtime(**{"threads": 1, "py_workers": 0, **runtime}))
    return EvalLoader(index, spec, **shard)


def planted(tree: Path, *kinds: str) -> set[str]:
    """Root-relative paths of the files `make-synthetic --corrupt` planted, of these kinds."""
    return {p["path"] for p in json.loads((tree / "synthetic.json").read_text())["planted"] if p["kind"] in kinds}


def bogus_huffman_table(data: bytes) -> bytes:
    """A JPEG whose Huffman table is garbage: header and end marker fine, so it passes the byte screen and
    kills the decoder."""
    dht = data.find(b"\xff\xc4")
    return data[:dht + 5] + b"\xff" * 20 + data[dht + 25:]


def cut_inside_the_scan(data: bytes) -> bytes:
    """A JPEG cut in the middle of its entropy-coded segment, as an interrupted copy leaves it: every header
    segment is whole (its size reads fine), the end-of-image marker is gone."""
    sos = data.find(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")  # the first byte after the scan header
    return data[:scan + (len(data) - scan) // 2]


def tree_with_a_broken_file(tree: Path, dest: Path, damage: Callable[[bytes], bytes]) -> tuple[ImageIndex, str]:
    """`tree`'s training images less its undecodable ones, linked under `dest`, with one file's bytes replaced
    by `damage(bytes)`. Returns the index and that file."""
    index = index_train(tree)
    keep = [i for i, f in enumerate(index.files) if f not in planted(tree, "truncated", "zero_bytes")]
    index = ImageIndex(index.root, tuple(index.files[i] for i in keep), index.labels[keep], index.classes)
    victim = index.files[3]
    data = (index.root / victim).read_bytes()
    for f in set(index.files):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).symlink_to(index.root / f)
    (dest / victim).unlink()
    (dest / victim).write_bytes(damage(data))
    return ImageIndex(dest, index.files, index.labels, index.classes), victim


# ------------------------------------------------------- the whole loop in one process, built from parts
N_TRAIN, N_VAL, BATCH = 96, 24, 8  # 12 steps per epoch
# 3 epochs of 12 steps, checkpoints every 5 steps and at each epoch end: 5, 10, 12, 15, 20, 24, 25, 30, 35, 36
IN_MEMORY = ("model.num_classes=3", "train.device=cpu", "train.epochs=3", f"train.batch_size={BATCH}",
             "train.log_every=4", "train.checkpoint_every=5", "optim.lr=0.1", "optim.reference_batch=8",
             "optim.warmup_epochs=1")


def tensors(n: int, seed: int, poisoned_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class set: images shifted by their label; optionally one batch of NaN images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, 3, 16, 16, generator=g) + labels[:, None, None, None].float()
    if poisoned_batch is not None:
        images[poisoned_batch * BATCH:(poisoned_batch + 1) * BATCH] = float("nan")
    return images, labels


class SignalAt(ResidentLoader):
    """Training batches that ask `control` for a checkpoint and a stop while batch `at` is taken (overall
    count), as a signal handler would during that step."""

    def __init__(self, control: RunControl, at: int, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.control, self.at, self.taken = control, at, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.taken += 1
            if self.taken == self.at:
                self.control.request_checkpoint(stop=True)
            yield batch


def small_model(cfg: Config, ballast_mb: int = 0) -> nn.Module:
    """A small conv net; `ballast_mb` adds a constant buffer of that size, so that a checkpoint takes a while to write."""
    torch.manual_seed(cfg.train.seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    if ballast_mb:
        model.register_buffer("ballast", torch.randn(ballast_mb << 18))  # 4-byte floats
    return model


@contextlib.contextmanager
def process_settings_kept() -> Iterator[None]:
    """Undo what `training.build` sets for the whole process (threads, deterministic algorithms) afterwards."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def fit_in_memory(out: Path, resume: str | None, control: RunControl | None = None, train: Any = None,
                  sets: Sequence[str] = (), ballast_mb: int = 0, model: nn.Module | None = None) -> dict:
    """`training.engine.fit` of the IN_MEMORY config (plus `sets`) on resident tensors: no data folder, no DALI;
    of `model` when given (a test that watches its weights), else a fresh `small_model`."""
    cfg = load_config(None, [*IN_MEMORY, *sets])
    train = train or ResidentLoader(*tensors(N_TRAIN, 123), BATCH)
    val = ResidentLoader(*tensors(N_VAL, 7), BATCH, positions=True)
    r = build(cfg, place_run(cfg, DistInfo()), out, control=control, data=Data(("a", "b", "c")),
              loaders=(train, val), model=model or small_model(cfg, ballast_mb))
    try:
        return fit(r, resume)
    finally:
        r.close()


def flip_a_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in a checkpoint file (torch.load would not notice)."""
    with zipfile.ZipFile(path) as z:
        largest = max(z.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[largest.header_offset + 26:largest.header_offset + 30])
    start = largest.header_offset + 30 + name_len + extra_len  # the record's bytes follow its local header
    data[start + largest.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Keep the first half of a file's bytes, as a crash or an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def as_version_1(state: dict) -> dict:
    """A checkpoint dict as the code before format version 2 wrote it: the same keys less `kind`, format_version 1."""
    old = {k: v for k, v in state.items() if k != "kind"}
    old["format_version"] = 1
    return old


class CheckpointRecorder(RunControl):
    """A RunControl that agrees on requests at every step and records the steps of the checkpoints it asked for."""

    def __init__(self) -> None:
        super().__init__(check_every=1)
        self.saved: list[int] = []

    def on_checkpoint_saved(self, path: Path, step: int) -> None:
        self.saved.append(step)


LEARN_CLASSES = 6
LEARN_EPOCHS = 4


def train_demo_recipe(data: Path, cache: Path, out: Path, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    """`senet train configs/demo.yaml` on `data` (num_classes set to match), 4 epochs: the recipe a new user runs."""
    classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
    sets = (f"model.num_classes={classes}", f"data.root={data}", f"data.cache_dir={cache}",
            f"train.epochs={LEARN_EPOCHS}", *sets)
    return subprocess.run([sys.executable, "-m", "senet", "train", str(ROOT / "configs" / "demo.yaml"), "--nproc",
                           str(nproc), "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


# ----------------------------------------------------------------------------------- the local Slurm cluster
ENV_FILE = ROOT / ".slurm-local" / "env"


def read_env_file(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines of a shell file, as a dict."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


def start_cluster() -> dict[str, str]:
    """`make slurm-up` (idempotent) and the cluster's environment; skips without root."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it starts daemons); run the tests as root")
    started = subprocess.run(["make", "-s", "slurm-up"], cwd=ROOT, capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"make slurm-up failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    return read_env_file(ENV_FILE)


def slurm(*args: str) -> str:
    """Run a Slurm client command and return its stdout."""
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 0.2 s; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def job_state(job_id: str) -> str:
    """The state squeue reports, or '' once the job has left the queue."""
    return slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def sacct_states(job_id: str) -> list[str]:
    """Accounting states of each run of the job, oldest first (requeues included)."""
    return [line.split()[0] for line in slurm("sacct", "-n", "-X", "-P", "--duplicates", "-j", job_id,
                                              "-o", "State").splitlines() if line.strip()]
