"""`make gpu-check`: the GPU path end to end on the machine at hand, in independent sections.

Runs from the checkout as it is (the code found through PYTHONPATH, nothing installed, no network),
with any interpreter that has torch, DALI (any CUDA flavour), numpy, pillow, scipy, pyyaml and pytest:
a lent GPU machine has another torch and CUDA than a workstation, and no internet.

    make gpu-check                               # DEVICE=gpu, PYTHON=python3, GPU_CHECK_OUT=gpu-check
    make gpu-check SECTIONS=input,train          # rerun a few sections; the others' results are kept
    make gpu-check DEVICE=cpu                    # the same script with small sizes on the CPU (minutes)

Sections (each in its own process with its own timeout; result.json and RESULT.md are rewritten
after each, so a crash or a timeout loses nothing else):

  env            card, driver, CUDA, torch, DALI and Python versions, free /dev/shm, CPUs
  tests          `pytest -m gpu` on the device (GPU vs CPU loader on the same draws, ten-crop eval, a bad
                 file mid-epoch that forces a rebuild with spawned workers, no host sync in a step,
                 stop + resume on the device)
  input          `bench-input` every stage on ImageNet-like JPEGs (500x375, q90, ~100 KB)
  decode_hw      whole-image decoding at hw_decoder_load 0 and at the default (the hardware decoder)
  train          `bench-train`, bf16, channels_last + NHWC batches: real data vs a synthetic batch on the
                 device; SE-ResNeXt-50 at 32 and 128 eager and 128 compiled, SE-ResNet-50 and ResNet-50
                 at 128 (the SE overhead); images/s, stall fraction, peak memory
  nccl           a 2-rank DDP run (NCCL) when the machine has >= 2 GPUs (gloo ranks with DEVICE=cpu)
  train_predict  `senet train`, one short epoch (checkpoint write time) + `senet predict` on val:
                 single-crop top-1 against the engine's, ten-crop images/s

Measures and reports; never asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's code, not an installed copy

SECTIONS = ("env", "tests", "input", "decode_hw", "train", "nccl", "train_predict")
# Per device: data sizes, batch sizes and timeouts; the gpu default run fits in ~6 minutes on one H100.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": dict(photos=4096, photo_classes=64, input_batch=256, input_batches=40, input_warmup=8, py_workers=4,
                train_warmup=8, train_batches=30, crop=224, train_classes=10, train_per_class=100, predict_batch=64,
                timeouts=dict(env=60, tests=240, input=180, decode_hw=90, train=420, nccl=120, train_predict=180),
                train_runs=[("se_resnext50_32x4d", 32, False), ("se_resnext50_32x4d", 128, False),
                            ("se_resnext50_32x4d", 128, True), ("se_resnet50", 128, False), ("resnet50", 128, False)]),
    "cpu": dict(photos=96, photo_classes=4, input_batch=8, input_batches=4, input_warmup=1, py_workers=1,
                train_warmup=1, train_batches=2, crop=64, train_classes=4, train_per_class=12, predict_batch=8,
                timeouts=dict(env=60, tests=300, input=180, decode_hw=120, train=300, nccl=180, train_predict=240),
                train_runs=[("se_resnext_tiny", 8, False), ("se_resnext_tiny", 8, True)]),
}
COMPILE_TIMEOUT_S = {"gpu": 240, "cpu": 150}


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
    if done.is_file():
        return root
    jobs = []
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"n{i % classes:08d}_{i}.JPEG", i))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_photo, jobs, chunksize=32))
    done.write_text("ok\n")
    return root


def ilsvrc_tree(root: Path, classes: int, per_class: int) -> Path:
    """A small learnable ILSVRC2012-layout tree with a devkit (`senet make-synthetic`), kept between runs."""
    from pipeline.synthetic import SyntheticSpec, make_synthetic

    if not (root / "ILSVRC2012_devkit_t12").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        make_synthetic(root, SyntheticSpec(classes=classes, train_per_class=per_class, val_per_class=10, test=0,
                                           seed=0), workers=os.cpu_count() or 2)
    return root


# ------------------------------------------------------------------------------------------ sections
def section_env(device: str, out: Path, size: dict) -> dict:
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError as e:
        versions["dali"] = f"missing ({e})"
    versions["cuda"] = torch.version.cuda
    card, gpus = cpu_model(), 0
    if device == "gpu":
        gpus = torch.cuda.device_count()
        card = torch.cuda.get_device_name(0) if gpus else "no GPU visible"
        versions["driver"] = nvidia_smi("driver_version")
        versions["cudnn"] = torch.backends.cudnn.version()
    stat = os.statvfs("/dev/shm")
    return {"card": card, "gpus": gpus, "versions": versions, "shm_gib": round(stat.f_bavail * stat.f_frsize / 2**30, 2),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "affinity": len(os.sched_getaffinity(0))}


def section_tests(device: str, out: Path, size: dict) -> dict:
    report = out / "tests.xml"
    env = {**os.environ, "SENET_TEST_DEVICE": device, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                           f"--junitxml={report}", str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=size["timeouts"]["tests"] - 10)
    (out / "tests.log").write_text(done.stdout + done.stderr)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": {"passed": total - failures - errors - skipped, "failed": failures + errors, "skipped": skipped,
                      "failed_names": failed, "log": str(out / "tests.log")}}


def _bench_spec(device: str, size: dict, **kw: Any):
    from pipeline.bench import BenchSpec
    from training.placement import place

    here = place(device, py_workers=size["py_workers"])
    return here, BenchSpec(device=device, device_id=here.gpu_index, batch_size=size["input_batch"],
                           threads=here.dali_threads, py_workers=size["py_workers"], batches=size["input_batches"],
                           warmup=size["input_warmup"], crop_size=size["crop"], **kw)


def section_input(device: str, out: Path, size: dict) -> dict:
    from pipeline.bench import STAGES, run_bench
    from pipeline.datasets import index_train

    index = index_train(photo_tree(out / "photos", size["photos"], size["photo_classes"]))
    here, spec = _bench_spec(device, size)
    result = run_bench(index, spec, STAGES)
    return {"input": result["stages"], "input_cpu_ms_per_image": result["cpu_ms_per_image"],
            "input_setup": {"placement": here.describe(), "batch_size": spec.batch_size, "batches": spec.batches,
                            "images": len(index), "dtype": spec.dtype, "layout": spec.layout}}


def section_decode_hw(device: str, out: Path, size: dict) -> dict:
    from pipeline.bench import measure_stage
    from pipeline.dali import HW_DECODER_LOAD
    from pipeline.datasets import index_train

    index = index_train(photo_tree(out / "photos", size["photos"], size["photo_classes"]))
    rates = {}
    for load in (0.0, HW_DECODER_LOAD, 1.0):
        _, spec = _bench_spec(device, size, hw_decoder_load=load)
        rates[str(load)] = measure_stage(index, "decode", spec).images_per_s
    return {"decode_hw": rates}


def _config(out: Path, name: str, lines: str) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(lines)
    return path


def section_train(device: str, out: Path, size: dict) -> dict:
    tree = photo_tree(out / "photos", size["photos"], size["photo_classes"])
    config = _config(out, "bench_train", f"model:\n  num_classes: {size['photo_classes']}\n  channels_last: true\n"
                     f"data:\n  root: {tree}\n  layout: NHWC\n  crop_size: {size['crop']}\n"
                     f"  py_workers: {size['py_workers']}\n  cache_dir: {out / 'cache'}\n"
                     f"train:\n  device: {device}\n  precision: bf16\n")
    runs = []
    for arch, batch, compiled in size["train_runs"]:
        row: dict[str, Any] = {"arch": arch, "batch_size": batch, "precision": "bf16", "channels_last": True,
                               "compile": compiled}
        target = out / f"train_{arch}_{batch}{'_compiled' if compiled else ''}.json"
        cmd = [sys.executable, "-m", "senet", "bench-train", str(config), "--batches", str(size["train_batches"]),
               "--warmup", str(size["train_warmup"]), "--json", str(target), "--set", f"model.arch={arch}",
               "--set", f"train.batch_size={batch}", "--set", f"train.compile={str(compiled).lower()}"]
        timeout = COMPILE_TIMEOUT_S[device] if compiled else size["timeouts"]["train"] // 2
        try:
            done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                  text=True, timeout=timeout)
            ok = done.returncode == 0 and target.is_file()
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] if not ok else []
        except subprocess.TimeoutExpired:
            ok, detail = False, [f"timed out after {timeout} s"]
        if ok:
            r = json.loads(target.read_text())
            row.update({k: r[k] for k in ("real_images_per_s", "synthetic_images_per_s", "max_memory_gib",
                                          "data_wait_fraction", "bound")})
            row["stall_fraction"] = r["data_stall_fraction"]
        elif compiled:  # torch.compile unavailable here (no compiler, an unsupported op): noted, not a failure
            row["compile"] = f"unavailable: {' '.join(detail)[:300]}"
        else:
            row["error"] = " ".join(detail)[:300]
        runs.append(row)
    failed = [r for r in runs if "error" in r]
    result: dict[str, Any] = {"train": runs}
    if failed:
        result["error"] = f"{len(failed)} of {len(runs)} bench-train runs failed: {failed[0]['error']}"
    return result


def section_nccl(device: str, out: Path, size: dict) -> dict:
    from training.placement import gpu_count

    if device == "gpu" and gpu_count() < 2:
        return {"nccl": "skipped: this machine has 1 GPU", "status": "skipped"}
    tree = ilsvrc_tree(out / "ilsvrc", size["train_classes"], size["train_per_class"])
    config = _config(out, "nccl", f"model:\n  arch: se_resnext_tiny\n  num_classes: {size['train_classes']}\n"
                     f"data:\n  root: {tree}\n  crop_size: 64\n  cache_dir: {out / 'cache'}\n  py_workers: 1\n"
                     f"  samples_per_epoch: 64\ntrain:\n  device: {device}\n  epochs: 1\n  batch_size: 8\n"
                     f"  log_every: 1\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "senet", "train", str(config), "--nproc", "2", "--out",
                           str(out / "nccl_run"), "--resume", "none"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=size["timeouts"]["nccl"] - 10)
    if done.returncode != 0:
        raise RuntimeError(f"2-rank run failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return {"nccl": {"backend": "nccl" if device == "gpu" else "gloo", "ranks": 2, "seconds": time.perf_counter() - start,
                     "summary": done.stdout.strip().splitlines()[-1]}}


def section_train_predict(device: str, out: Path, size: dict) -> dict:
    import numpy as np

    from pipeline.devkit import load_devkit, read_ground_truth
    from training.metrics import read_metrics
    from training.placement import place
    from training.predict import image_index, predict
    from training.submission import score, top_ids

    tree = ilsvrc_tree(out / "ilsvrc", size["train_classes"], size["train_per_class"])
    run = out / "train_run"
    config = _config(out, "train_predict", f"model:\n  arch: se_resnext_tiny\n  num_classes: {size['train_classes']}\n"
                     f"data:\n  root: {tree}\n  crop_size: {size['crop']}\n  cache_dir: {out / 'cache'}\n"
                     f"  py_workers: {size['py_workers']}\ntrain:\n  device: {device}\n  epochs: 1\n  batch_size: 32\n"
                     f"  log_every: 5\n  checkpoint_every: 10\n")
    done = subprocess.run([sys.executable, "-m", "senet", "train", str(config), "--out", str(run), "--resume", "none"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=size["timeouts"]["train_predict"] // 2)
    if done.returncode != 0:
        raise RuntimeError(f"senet train failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    rows = read_metrics(run / "metrics.jsonl")
    writes = [r["write_s"] for r in rows if r.get("event") == "checkpoint"]
    engine_top1 = max(r["val_top1"] for r in rows if "val_top1" in r)
    kit = load_devkit(tree / "ILSVRC2012_devkit_t12")
    truth = read_ground_truth(tree / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt")
    images = image_index(tree / "val")
    here = place(device)
    result: dict[str, Any] = {"checkpoint_write_s": max(writes) if writes else None, "engine_top1": engine_top1}
    for ten_crop in (False, True):
        start = time.perf_counter()
        scores = predict(run / "checkpoints" / "best.pt", images, kit, here, ten_crop=ten_crop,
                         batch_size=size["predict_batch"], exclude=frozenset(), parts=out / "predict.parts")
        seconds = time.perf_counter() - start
        result_score = score(top_ids(scores.probs).tolist(), np.asarray(truth))
        top1 = round((1.0 - result_score.top1_error) * result_score.images) / result_score.images  # as the engine counts
        if ten_crop:
            result["predict_images_per_s"] = len(images) / seconds
            result["predict_ten_crop_top1"] = top1
        else:
            result["predict_top1"] = top1
            result["predict_single_crop_images_per_s"] = len(images) / seconds
    differing = abs(result["predict_top1"] - engine_top1) * len(images)
    result["top1_images_apart"] = round(differing)
    if differing > max(1.0, len(images) / 500):
        result["error"] = (f"predict top-1 {result['predict_top1']:.4f} vs engine {engine_top1:.4f}: "
                           f"{differing:.0f} of {len(images)} images apart")
    return result


RUNNERS: dict[str, Callable[[str, Path, dict], dict]] = {
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


def nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def render(result: dict) -> str:
    """RESULT.md: the figures as tables, with the machine they were measured on."""
    v = result.get("versions", {})
    lines = [f"# gpu-check on {result.get('card', '?')} ({result['device']})", "",
             f"driver {v.get('driver', '-')}, CUDA {v.get('cuda', '-')}, torch {v.get('torch', '-')}, "
             f"DALI {v.get('dali', '-')}, Python {v.get('python', '-')}; {result.get('cpus', '?')} CPUs, "
             f"/dev/shm {result.get('shm_gib', '?')} GiB free; {result.get('finished', '')}", "",
             "| section | status | seconds | error |", "| --- | --- | --- | --- |"]
    for name in SECTIONS:
        s = result["sections"].get(name)
        if s:
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('error', '')[:200]} |")
    if "tests" in result:
        t = result["tests"]
        lines += ["", f"tests: {t['passed']} passed, {t['failed']} failed, {t.get('skipped', 0)} skipped"
                  + (f" ({', '.join(t['failed_names'])})" if t.get("failed_names") else "")]
    if result.get("input"):
        lines += ["", "| input stage | images/s | CPU ms/image |", "| --- | --- | --- |"]
        cpu = result.get("input_cpu_ms_per_image", {})
        lines += [f"| {k} | {v:,.0f} | {cpu.get(k, float('nan')):.3f} |" for k, v in result["input"].items()]
    if result.get("decode_hw"):
        lines += ["", "| hw_decoder_load | decode images/s |", "| --- | --- |"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in result["decode_hw"].items()]
    if result.get("train"):
        lines += ["", "| arch | batch | compile | real img/s | synthetic img/s | stall | bound | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["train"]:
            if "real_images_per_s" in r:
                mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") is not None else "-"
                lines.append(f"| {r['arch']} | {r['batch_size']} | {r['compile']} | {r['real_images_per_s']:,.0f} | "
                             f"{r['synthetic_images_per_s']:,.0f} | {r['stall_fraction']:.1%} | {r.get('bound', '-')} | "
                             f"{mem} |")
            else:
                lines.append(f"| {r['arch']} | {r['batch_size']} | {r['compile']} | {r.get('error', '-')} | | | | |")
    for key in ("checkpoint_write_s", "predict_images_per_s", "engine_top1", "predict_top1", "nccl"):
        if key in result:
            lines.append(f"\n{key}: {result[key]}")
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "RESULT.md").write_text(render(result))


def run_section(name: str, device: str, out: Path) -> None:
    """In a child process: one section, its results as JSON on the last line of out/sections/NAME.json."""
    size = SIZES[device]
    (out / "sections").mkdir(parents=True, exist_ok=True)
    try:
        result = RUNNERS[name](device, out, size)
    except Exception as e:  # noqa: BLE001 - a section's failure is its result
        result = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
    (out / "sections" / f"{name}.json").write_text(json.dumps(result, default=str))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default=os.environ.get("DEVICE") or "gpu")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu-check")
    p.add_argument("--sections", default=os.environ.get("SECTIONS") or ",".join(SECTIONS))
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        run_section(args.section, args.device, out)
        return 0
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"gpu-check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    previous = out / "result.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() and len(chosen) < len(SECTIONS) else {}
    if result.get("device") not in (None, args.device):
        result = {}
    result.update({"device": args.device, "sections": result.get("sections", {})})
    for name in chosen:
        timeout = SIZES[args.device]["timeouts"][name]
        print(f"gpu-check: {name} (up to {timeout} s) ...", flush=True)
        (out / "sections" / f"{name}.json").unlink(missing_ok=True)
        start = time.perf_counter()
        status, error = "ok", ""
        try:
            done = subprocess.run([sys.executable, __file__, "--device", args.device, "--out", str(out), "--section", name],
                                  cwd=ROOT, timeout=timeout, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            (out / "sections" / f"{name}.log").write_text(done.stdout + done.stderr)
            part_file = out / "sections" / f"{name}.json"
            part = json.loads(part_file.read_text()) if part_file.is_file() else {
                "error": f"crashed (exit {done.returncode}): {(done.stderr or '').strip().splitlines()[-1:]}"}
        except subprocess.TimeoutExpired:
            part = {"error": f"timed out after {timeout} s"}
            status = "timeout"
        error = part.pop("error", "")
        status = part.pop("status", "failed" if error and status == "ok" else status)
        part.pop("traceback", None)
        result.update(part)
        result["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 1),
                                    **({"error": error} if error else {})}
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        save(result, out)
        print(f"gpu-check: {name}: {status}" + (f" ({error[:200]})" if error else ""), flush=True)
    print(f"gpu-check: results in {out / 'result.json'} and {out / 'RESULT.md'}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
