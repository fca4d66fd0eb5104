"""The sections of `make gpu-check` (benchmarks/gpu_check.py runs each in its own process), their data
and their sizes.

A section is a function (device, out folder, profile, deadline, emit) -> result dict. It calls `emit`
with its result so far after every finished row, so a section stopped by its timeout keeps them; a
result with an "error" key marks the section failed, "status": "skipped" marks it skipped.

Profiles (`PROFILES`): `quick` for a borrowed GPU node whose whole window is short (its section
timeouts add up to `QUICK_BUDGET_S`, the most the run can take), `full` for a cluster's own node, and
`cpu` / `cpu-quick` (DEVICE=cpu: the same code on small sizes, for machines without a GPU). The quick
sizes are estimates from published H100 throughput (MLPerf Training ResNet-50: about 7,000 images/s per
H100; nvJPEG's hardware decoder: thousands of images/s), not yet measured here: the first quick run on
a GPU says how much of each timeout it used (RESULT.md's seconds and timeout columns).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's code, not an installed copy

from pipeline.processes import kill_tree  # noqa: E402 - after the path: the checkout's own

SECTIONS = ("env", "tests", "input", "decode_hw", "train", "nccl", "train_predict")
QUICK_BUDGET_S = 390  # the quick profile's section timeouts add up to this: 6.5 minutes at most
# senet's dependencies that the bare interpreter of a GPU node need not have (README, GPU section).
OPTIONAL_PACKAGES = ("submitit", "tensorboard", "matplotlib", "tqdm")
# bf16 keeps 8 significant bits: a logit near 5 is known to about +-0.02, and two processes whose cudnn
# autotuning chose different kernels may round it differently. An image whose two best logits are
# closer than this can change its top-1 class between the engine's evaluation and predict on a GPU.
NEAR_TIE_LOGITS = 0.05


@dataclass(frozen=True)
class TrainRun:
    """One `bench-train` run of the train section, with its own timeout."""

    arch: str
    batch: int
    compiled: bool
    timeout_s: int


@dataclass(frozen=True)
class Profile:
    """Data sizes, batch sizes and per-section timeouts of one kind of gpu-check run."""

    name: str
    photos: int  # ImageNet-like JPEGs of the input, decode_hw and train sections
    photo_classes: int
    input_batch: int
    input_batches: int
    input_warmup: int
    py_workers: int
    train_warmup: int
    train_batches: int
    crop: int
    train_classes: int  # the learnable ILSVRC-layout tree of the nccl and train_predict sections
    train_per_class: int
    train_runs: tuple[TrainRun, ...]
    timeouts: dict[str, int] = field(default_factory=dict)  # every section but `train` (the sum of its runs)

    def timeout(self, section: str) -> int:
        """Seconds the section may take, its start included."""
        if section == "train":
            return sum(r.timeout_s for r in self.train_runs) + 10
        return self.timeouts[section]


def _eager(arch: str, batch: int, timeout_s: int) -> TrainRun:
    return TrainRun(arch, batch, False, timeout_s)


PROFILES: dict[str, Profile] = {
    # A borrowed H100/H200 node: the whole window (start and transfers included) may be 15 minutes.
    "quick": Profile("quick", photos=2048, photo_classes=32, input_batch=256, input_batches=16, input_warmup=4,
                     py_workers=4, train_warmup=5, train_batches=20, crop=224, train_classes=10, train_per_class=50,
                     train_runs=(_eager("se_resnext50_32x4d", 128, 45), _eager("resnet50", 128, 35)),
                     timeouts=dict(env=10, tests=105, input=40, decode_hw=45, nccl=40, train_predict=60)),
    # A cluster's own node: every measurement, torch.compile included, with room to spare.
    "full": Profile("full", photos=4096, photo_classes=64, input_batch=256, input_batches=40, input_warmup=8,
                    py_workers=4, train_warmup=8, train_batches=30, crop=224, train_classes=10, train_per_class=100,
                    train_runs=(_eager("se_resnext50_32x4d", 32, 150), _eager("se_resnext50_32x4d", 128, 150),
                                TrainRun("se_resnext50_32x4d", 128, True, 480), _eager("se_resnet50", 128, 150),
                                _eager("resnet50", 128, 150)),
                    timeouts=dict(env=60, tests=300, input=240, decode_hw=180, nccl=240, train_predict=300)),
    # DEVICE=cpu: the same code on small sizes (a 2-core machine).
    "cpu": Profile("cpu", photos=96, photo_classes=4, input_batch=8, input_batches=4, input_warmup=1, py_workers=1,
                   train_warmup=1, train_batches=2, crop=64, train_classes=4, train_per_class=12,
                   train_runs=(_eager("se_resnext_tiny", 8, 150), TrainRun("se_resnext_tiny", 8, True, 200)),
                   timeouts=dict(env=60, tests=300, input=180, decode_hw=180, nccl=180, train_predict=240)),
}
PROFILES["cpu-quick"] = replace(PROFILES["cpu"], name="cpu-quick", train_runs=PROFILES["cpu"].train_runs[:1])  # no compile


def profile_for(device: str, quick: bool) -> Profile:
    """The profile of a run on `device` ('gpu' or 'cpu'), quick or full."""
    if device == "gpu":
        return PROFILES["quick" if quick else "full"]
    return PROFILES["cpu-quick" if quick else "cpu"]


Emit = Callable[[dict], None]


# ------------------------------------------------------------------------------------------ data
def _photo(args: tuple[Path, int]) -> None:
    """One ImageNet-like JPEG: 500x375, quality 90, a smooth random scene plus sensor-like noise (~100 KB)."""
    import numpy as np
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    scene = Image.fromarray((rng.random((17, 22, 3)) * 255).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(scene, np.float32) + rng.normal(0, 18, (375, 500, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def photo_tree(root: Path, images: int, classes: int) -> Path:
    """A folder of class folders of ImageNet-like JPEGs (kept between runs)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{images} {classes}\n":
        return root
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"n{i % classes:08d}_{i}.JPEG", i))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_photo, jobs, chunksize=32))
    done.write_text(f"{images} {classes}\n")
    return root


def ilsvrc_tree(root: Path, classes: int, per_class: int) -> Path:
    """A small learnable ILSVRC2012-layout tree with a devkit (`senet make-synthetic`), kept between runs."""
    from pipeline.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(classes=classes, train_per_class=per_class, val_per_class=10, test=0, seed=0)
    done = root / ".complete"
    if not done.is_file() or done.read_text() != f"{classes} {per_class}\n":
        shutil.rmtree(root, ignore_errors=True)
        make_synthetic(root, spec, workers=os.cpu_count() or 2)
        done.write_text(f"{classes} {per_class}\n")
    return root


# ------------------------------------------------------------------------------------------ commands
def child_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (what was there before stays, after it)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *rest])}


def run_command(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` in the checkout; past `timeout` seconds it is killed with everything it started (DALI workers,
    compile workers, ranks) and TimeoutExpired is raised."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def last_line(done: subprocess.CompletedProcess) -> str:
    """The last non-empty line a failed command printed (its error, by the CLI's rule)."""
    lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit status {done.returncode}, no output"


def _config(out: Path, name: str, text: str) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ sections
def section_env(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """The machine: the fields benchmarks/RESULTS_gpu.json keeps (card, driver, CUDA, torch, DALI) and more."""
    import numpy
    import torch

    machine: dict[str, Any] = {"card": cpu_model(), "gpus": 0, "driver": None, "cuda": torch.version.cuda,
                               "cudnn": None, "torch": torch.__version__, "dali": None,
                               "python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import nvidia.dali

        machine["dali"] = nvidia.dali.__version__
    except ImportError as e:
        machine["dali"] = f"missing ({e})"
    if device == "gpu":
        machine["gpus"] = torch.cuda.device_count()
        machine["card"] = torch.cuda.get_device_name(0) if machine["gpus"] else "no GPU visible"
        machine["driver"] = nvidia_smi("driver_version")
        machine["cudnn"] = torch.backends.cudnn.version()
    dali = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-dali"))
    stat = os.statvfs("/dev/shm")
    machine.update(dali_distributions=dali, cpu_model=cpu_model(), cpus=os.cpu_count(),
                   affinity=len(os.sched_getaffinity(0)), shm_gib=round(stat.f_bavail * stat.f_frsize / 2**30, 2),
                   optional={name: _version(name) for name in OPTIONAL_PACKAGES})
    result: dict[str, Any] = {"machine": machine}
    if len(dali) > 1:  # both write nvidia/dali/: whichever was installed last wins, removing one breaks the other
        result["error"] = (f"{len(dali)} DALI distributions in one environment ({', '.join(dali)}); uninstall all of "
                           f"them and install the one for this machine's CUDA (README: GPU machines)")
    if device == "gpu" and not machine["gpus"]:
        result["error"] = "no GPU visible to torch (CUDA_VISIBLE_DEVICES, driver, or a CPU build of torch)"
    return result


def section_tests(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """`pytest -m gpu`: failed when any test failed or errored, and when none ran (all skipped counts as none)."""
    report = out / "tests.xml"
    report.unlink(missing_ok=True)
    env = {**child_env(), "SENET_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={report}", str(ROOT / "tests")]
    try:
        done = run_command(cmd, deadline - time.monotonic() - 5, env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": "pytest ran out of the section's time (TIMEOUTS=tests=SECONDS gives it "
                "more)"}
    (out / "tests.log").write_text(done.stdout + done.stderr)
    if not report.is_file():
        return {"error": f"pytest wrote no report (exit {done.returncode}): {last_line(done)}"}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    cases = list(suite.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skips = sorted({(c.find("skipped").get("message") or "").strip()[:120] for c in cases if c.find("skipped") is not None})
    passed = total - failures - errors - skipped
    result: dict[str, Any] = {"tests": {"passed": passed, "failed": failures + errors, "skipped": skipped,
                                        "failed_names": failed, "skip_reasons": skips, "exit": done.returncode,
                                        "log": str(out / "tests.log")}}
    if failures + errors:
        result["error"] = f"{failures + errors} of {total} GPU tests failed: {', '.join(failed)[:300]}"
    elif passed == 0:
        result["error"] = f"no GPU test ran ({skipped} skipped: {'; '.join(skips)[:250] or 'none collected'})"
    elif done.returncode != 0:
        result["error"] = f"pytest exited {done.returncode}: {last_line(done)}"
    return result


def _bench_spec(device: str, profile: Profile, **data: Any):
    """The placement and bench spec of a training config with the profile's input (and `data.*` overrides)."""
    from pipeline.bench import BenchSpec
    from training.config import load_config
    from training.inputs import train_input
    from training.placement import place_run
    from training.ranks import DistInfo

    # The batch layout training feeds a channels_last model on a GPU (data.layout auto): NHWC.
    cfg = load_config(None, [f"train.device={device}", f"train.batch_size={profile.input_batch}",
                             f"data.py_workers={profile.py_workers}", f"data.crop_size={profile.crop}",
                             f"data.layout={'NHWC' if device == 'gpu' else 'NCHW'}",
                             *(f"data.{key}={value}" for key, value in data.items())])
    here = place_run(cfg, DistInfo())
    return here, BenchSpec(input=train_input(cfg, here), batches=profile.input_batches, warmup=profile.input_warmup)


def section_input(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """Every bench-input stage, after the node check training does first (free /dev/shm, locked memory)."""
    from pipeline.bench import STAGES, measure_stage
    from pipeline.dali import decoder_options, pinned_decoder_bytes
    from pipeline.datasets import index_train
    from training.placement import check_node, input_shm_bytes, mean_file_bytes

    index = index_train(photo_tree(out / "photos", profile.photos, profile.photo_classes))
    here, spec = _bench_spec(device, profile)
    shm = input_shm_bytes(here, spec.batch_size, mean_file_bytes(index.root, index.files), spec.runtime.prefetch,
                          pipelines=1)
    decoder = decoder_options(device, here.dali_threads, spec.runtime.hw_decoder_load)
    check_node(here, shm_needed=shm, pinned_needed=pinned_decoder_bytes(decoder, here.dali_threads))
    result: dict[str, Any] = {"input": {}, "input_cpu_ms_per_image": {},
                              "input_setup": {"placement": here.describe(), "batch_size": spec.batch_size,
                                              "batches": spec.batches, "images": len(index),
                                              "dtype": spec.input.dtype, "layout": spec.input.layout,
                                              "shm_needed_mib": round(shm / 2**20)}}
    for stage in STAGES:
        rate = measure_stage(index, stage, spec)
        result["input"][stage] = rate.images_per_s
        result["input_cpu_ms_per_image"][stage] = rate.cpu_ms_per_image
        emit(result)
    return result


def section_decode_hw(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """Decoding at hw_decoder_load 0, the default and 1: whole images, and the regions training decodes."""
    from pipeline.bench import measure_stage
    from pipeline.dali import HW_DECODER_LOAD
    from pipeline.datasets import index_train

    index = index_train(photo_tree(out / "photos", profile.photos, profile.photo_classes))
    result: dict[str, Any] = {"decode_hw": {"whole": {}, "region": {}}}
    for load in (0.0, HW_DECODER_LOAD, 1.0):
        _, spec = _bench_spec(device, profile, hw_decoder_load=load)
        for kind, stage in (("region", "decode_region"), ("whole", "decode")):
            result["decode_hw"][kind][str(load)] = measure_stage(index, stage, spec).images_per_s
            emit(result)
    return result


def section_train(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """bench-train runs (bf16, channels_last, data.layout auto): real vs synthetic images/s, stall, memory."""
    tree = photo_tree(out / "photos", profile.photos, profile.photo_classes)
    config = _config(out, "bench_train", f"model:\n  num_classes: {profile.photo_classes}\n  channels_last: true\n"
                     f"data:\n  root: {tree}\n  crop_size: {profile.crop}\n  py_workers: {profile.py_workers}\n"
                     f"  cache_dir: {out / 'cache'}\ntrain:\n  device: {device}\n  precision: bf16\n")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"train": runs}
    for run in profile.train_runs:
        row: dict[str, Any] = {"arch": run.arch, "batch_size": run.batch, "precision": "bf16", "compile": run.compiled}
        target = out / f"train_{run.arch}_{run.batch}{'_compiled' if run.compiled else ''}.json"
        target.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "senet", "bench-train", str(config), "--batches", str(profile.train_batches),
               "--warmup", str(profile.train_warmup), "--json", str(target), "--set", f"model.arch={run.arch}",
               "--set", f"train.batch_size={run.batch}", "--set", f"train.compile={str(run.compiled).lower()}"]
        left = deadline - time.monotonic() - 2
        if left < 5:  # the section's time is up: the remaining runs are not started
            result.update(status="timeout", error=f"the section's time ran out after {len(runs)} of "
                          f"{len(profile.train_runs)} runs (TIMEOUTS=train=SECONDS gives it more)")
            return result
        timeout = min(run.timeout_s, left)
        try:
            done = run_command(cmd, timeout)
            problem = "" if done.returncode == 0 and target.is_file() else last_line(done)
        except subprocess.TimeoutExpired:
            problem = f"timed out after {timeout:.0f} s"
        if not problem:
            r = json.loads(target.read_text())
            row.update({k: r[k] for k in ("layout", "channels_last", "real_images_per_s", "synthetic_images_per_s",
                                          "max_memory_gib", "data_wait_fraction", "bound")})
            row["stall_fraction"] = r["data_stall_fraction"]
        elif run.compiled:  # no compiler, an unsupported op, a compile slower than its time: noted, not a failure
            row["compile"] = f"unavailable: {problem}"
        else:
            row["error"] = problem
        runs.append(row)
        emit(result)
    failed = [r for r in runs if "error" in r]
    if failed:
        result["error"] = f"{len(failed)} of {len(runs)} bench-train runs failed: {failed[0]['error']}"
    return result


def section_nccl(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """A 2-rank DDP run (nccl on GPUs, gloo ranks with DEVICE=cpu)."""
    from training.placement import gpu_count

    if device == "gpu" and gpu_count() < 2:
        return {"nccl": "skipped: this machine has 1 GPU", "status": "skipped"}
    tree = ilsvrc_tree(out / "ilsvrc", profile.train_classes, profile.train_per_class)
    config = _config(out, "nccl", f"model:\n  arch: se_resnext_tiny\n  num_classes: {profile.train_classes}\n"
                     f"data:\n  root: {tree}\n  crop_size: 64\n  cache_dir: {out / 'cache'}\n  py_workers: 1\n"
                     f"  samples_per_epoch: 64\ntrain:\n  device: {device}\n  epochs: 1\n  batch_size: 8\n"
                     f"  log_every: 1\n")
    start = time.perf_counter()
    done = run_command([sys.executable, "-m", "senet", "train", str(config), "--nproc", "2", "--out",
                        str(out / "nccl_run"), "--resume", "none"], deadline - time.monotonic() - 2)
    if done.returncode != 0:
        return {"error": f"2-rank run failed: {last_line(done)}"}
    return {"nccl": {"backend": "nccl" if device == "gpu" else "gloo", "ranks": 2, "seconds": time.perf_counter() - start,
                     "summary": done.stdout.strip().splitlines()[-1]}}


def section_train_predict(device: str, out: Path, profile: Profile, deadline: float, emit: Emit) -> dict:
    """`senet train` one short epoch, then predict on val with the engine's batch and process settings.

    Engine and predict then see the same batches (so nvImageCodec hands the same images to the hardware
    decoder), the same precision, layout, threads and cudnn autotuning. On the CPU their top-1 must be
    equal; on a GPU they may differ by the near ties only (`NEAR_TIE_LOGITS`).
    """
    import numpy as np

    from pipeline.devkit import load_devkit, read_ground_truth
    from training.metrics import read_metrics
    from training.predict import image_index, predict
    from training.submission import score, top_ids

    tree = ilsvrc_tree(out / "ilsvrc", profile.train_classes, profile.train_per_class)
    run, batch = out / "train_run", 32
    config = _config(out, "train_predict", f"model:\n  arch: se_resnext_tiny\n  num_classes: {profile.train_classes}\n"
                     f"data:\n  root: {tree}\n  crop_size: {profile.crop}\n  cache_dir: {out / 'cache'}\n"
                     f"  py_workers: {profile.py_workers}\ntrain:\n  device: {device}\n  epochs: 1\n"
                     f"  batch_size: {batch}\n  log_every: 5\n  checkpoint_every: 10\n")
    start = time.monotonic()
    done = run_command([sys.executable, "-m", "senet", "train", str(config), "--out", str(run), "--resume", "none"],
                       (deadline - start) * 0.6)
    (out / "train_run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": f"senet train failed: {last_line(done)}"}
    rows = read_metrics(run / "metrics.jsonl")
    writes = [r["write_s"] for r in rows if r.get("event") == "checkpoint"]
    engine_top1 = max(r["val_top1"] for r in rows if "val_top1" in r)
    result: dict[str, Any] = {"train_seconds": round(time.monotonic() - start, 1),
                              "checkpoint_write_s": max(writes) if writes else None, "engine_top1": engine_top1,
                              "curves_png": (run / "curves.png").is_file()}
    emit(result)
    kit = load_devkit(tree / "ILSVRC2012_devkit_t12")
    truth = np.asarray(read_ground_truth(kit.path / "data" / "ILSVRC2012_validation_ground_truth.txt"))
    images = image_index(tree / "val")
    for ten_crop in (False, True):
        t0 = time.perf_counter()
        scores = predict(run / "checkpoints" / "best.pt", images, kit, device, ten_crop=ten_crop, batch_size=batch,
                         exclude=frozenset(), parts=out / "predict.parts")
        seconds = time.perf_counter() - t0
        graded = score(top_ids(scores.probs).tolist(), truth)
        top1 = round((1.0 - graded.top1_error) * graded.images) / graded.images  # as the engine counts
        name = "ten_crop" if ten_crop else "single_crop"
        result[f"predict_{name}_top1"], result[f"predict_{name}_images_per_s"] = top1, len(images) / seconds
        if not ten_crop:
            best_two = np.sort(scores.probs, axis=1)[:, -2:].astype(np.float64)
            gaps = np.log(np.maximum(best_two[:, 1], 1e-30)) - np.log(np.maximum(best_two[:, 0], 1e-30))
            result["near_ties"] = int((gaps < NEAR_TIE_LOGITS).sum())  # logit gap = log(p1 / p2)
        emit(result)
    apart = round(abs(result["predict_single_crop_top1"] - engine_top1) * len(images))
    allowed = result["near_ties"] if device == "gpu" else 0
    result.update(top1_images_apart=apart, top1_images_allowed=allowed)
    if apart > allowed:
        result["error"] = (f"predict top-1 {result['predict_single_crop_top1']:.4f} vs engine {engine_top1:.4f}: {apart} "
                           f"of {len(images)} images apart, {allowed} allowed "
                           f"({'near ties on a GPU' if device == 'gpu' else 'the CPU must agree exactly'})")
    return result


RUNNERS: dict[str, Callable[[str, Path, Profile, float, Emit], dict]] = {
    "env": section_env, "tests": section_tests, "input": section_input, "decode_hw": section_decode_hw,
    "train": section_train, "nccl": section_nccl, "train_predict": section_train_predict}


# ------------------------------------------------------------------------------------------ helpers
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi(field_name: str) -> str:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def _version(name: str) -> str | None:
    """The installed version of a distribution, None when absent or not importable."""
    import importlib.util

    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "importable"
