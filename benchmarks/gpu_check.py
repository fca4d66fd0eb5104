"""`make gpu-check`: the GPU path end to end on the machine at hand, in independent sections.

Runs from the checkout as it is (the code found through PYTHONPATH, nothing installed, no network),
with any interpreter that has torch, DALI (any CUDA flavour), numpy, pillow, scipy, pyyaml and pytest:
a lent GPU machine has another torch and CUDA than a workstation, no internet, and often none of
senet's other dependencies (submitit, tensorboard, matplotlib, tqdm are not needed here).

    make gpu-check QUICK=1                       # a borrowed GPU node: every section, <= 6.5 minutes
    make gpu-check                               # a cluster's own node: the full profile (torch.compile too)
    make gpu-check SECTIONS=input,train          # rerun a few sections; the others' results are kept
    make gpu-check TIMEOUTS=train=900            # more time for a section on a slow node
    make gpu-check DEVICE=cpu                    # the same script with small sizes on the CPU (minutes)

Sections (benchmarks/gpu_sections.py; each in its own process with its own timeout, which ends it and
everything it started):

  env            card, driver, CUDA, torch, DALI (and its distributions: one allowed), Python, /dev/shm
  tests          `pytest -m gpu` on the device; failed when a test fails or none runs
  input          the node check training does first (/dev/shm, locked memory), then `bench-input` every
                 stage on ImageNet-like JPEGs (500x375, q90, ~100 KB), NHWC as training feeds the GPU
  decode_hw      hw_decoder_load 0, default, 1: whole images, and the regions training decodes
  train          `bench-train` bf16, channels_last, data.layout auto: real vs synthetic images/s
  nccl           a 2-rank DDP run (NCCL) when the machine has >= 2 GPUs (gloo ranks with DEVICE=cpu)
  train_predict  `senet train` one short epoch + `senet predict` on val under the engine's batch and
                 settings: top-1 against the engine's, ten-crop images/s, checkpoint write time

Results: OUT/result.json and OUT/RESULT.md are rewritten whenever a section finishes a row, so a crash
or a timeout loses nothing already measured. result.json's `machine` holds card, driver, CUDA, torch
and DALI versions: the file is meant to be committed as benchmarks/RESULTS_gpu.json (RESULT.md as
benchmarks/RESULTS_gpu.md). Exit status 0 when every section is ok or skipped, 1 otherwise, 2 for a
usage error. Measures and reports; never asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's code, not an installed copy

from benchmarks.gpu_sections import RUNNERS, SECTIONS, Profile, child_env, profile_for  # noqa: E402
from pipeline.processes import kill_tree  # noqa: E402

POLL_S = 1.0  # how often a running section's rows are merged into result.json


# ------------------------------------------------------------------------------------------ one section
def run_section(name: str, device: str, profile: Profile, out: Path, timeout: float) -> None:
    """In a child process: one section; its rows so far, then its result, in out/sections/NAME.json."""
    part = out / "sections" / f"{name}.json"

    def emit(result: dict, final: bool = False) -> None:
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps({"final": final, "result": result}, default=str))
        os.replace(tmp, part)  # the parent never reads a half-written file

    deadline = time.monotonic() + timeout
    try:
        result = RUNNERS[name](device, out, profile, deadline, emit)
    except Exception as e:  # noqa: BLE001 - a section's failure is its result
        previous = json.loads(part.read_text())["result"] if part.is_file() else {}
        result = {**previous, "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
    emit(result, final=True)


def supervise(name: str, device: str, profile: Profile, out: Path, timeout: float, result: dict[str, Any]) -> None:
    """Run section `name` in a child process; merge its rows into `result` (saved) as they come; end it
    and everything it started at `timeout`."""
    part, log = out / "sections" / f"{name}.json", out / "sections" / f"{name}.log"
    part.unlink(missing_ok=True)
    for key in result["sections"].pop(name, {}).get("keys", []):  # an earlier run's figures of this section
        result.pop(key, None)
    start = time.monotonic()
    cmd = [sys.executable, __file__, "--device", device, "--profile", profile.name, "--out", str(out),
           "--section", name, "--section-timeout", str(timeout)]
    with open(log, "w") as sink:
        child = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
        seen, timed_out = 0.0, False
        while True:
            try:
                child.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - start > timeout:
                    kill_tree(child.pid)
                    child.wait()
                    timed_out = True
                    break
            if part.is_file() and part.stat().st_mtime != seen:  # a row finished: show it now
                seen = part.stat().st_mtime
                merge(result, name, _read(part)["result"], "running", time.monotonic() - start)
                save(result, out)
    state = _read(part) if part.is_file() else {"final": False, "result": {}}
    section = dict(state["result"])
    if timed_out:
        section["error"] = f"timed out after {timeout:.0f} s" + (" (its finished rows are kept)" if section else "")
        status = "timeout"
    elif not state["final"]:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        section["error"] = f"crashed (exit {child.returncode}): {' '.join(tail)[:300]}"
        status = "failed"
    else:
        status = section.pop("status", "failed" if "error" in section else "ok")
    merge(result, name, section, status, time.monotonic() - start)


def merge(result: dict[str, Any], name: str, section: dict, status: str, seconds: float) -> None:
    """A section's (partial) result into the run's: its data keys, and its line in `sections`."""
    section = dict(section)
    error = section.pop("error", "")
    section.pop("traceback", None)
    result.update(section)
    result["sections"][name] = {"status": status, "seconds": round(seconds, 1), **({"error": error} if error else {}),
                                "keys": sorted(section)}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"final": False, "result": {}}


# ------------------------------------------------------------------------------------------ results
def render(result: dict) -> str:
    """RESULT.md: the figures as tables, with the machine they were measured on."""
    m = result.get("machine", {})
    profile = result.get("profile", {})
    lines = [f"# gpu-check on {m.get('card', '?')} ({result['device']}, profile {profile.get('name', '?')})", "",
             f"driver {m.get('driver') or '-'}, CUDA {m.get('cuda') or '-'}, cuDNN {m.get('cudnn') or '-'}, "
             f"torch {m.get('torch', '-')}, DALI {m.get('dali', '-')}, Python {m.get('python', '-')}; "
             f"{m.get('gpus', 0)} GPU(s), {m.get('cpus', '?')} CPUs ({m.get('cpu_model', '?')}), /dev/shm "
             f"{m.get('shm_gib', '?')} GiB free; commit {result.get('commit', '?')}; {result.get('finished', '')}", "",
             "| section | status | seconds | timeout | error |", "| --- | --- | --- | --- | --- |"]
    for name in SECTIONS:
        s = result["sections"].get(name)
        if s:
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | "
                         f"{profile.get('timeouts', {}).get(name, '-')} | {s.get('error', '')[:200]} |")
    if "tests" in result:
        t = result["tests"]
        lines += ["", f"tests: {t['passed']} passed, {t['failed']} failed, {t.get('skipped', 0)} skipped"
                  + (f" ({', '.join(t['failed_names'])})" if t.get("failed_names") else "")]
    if result.get("input"):
        lines += ["", "| input stage | images/s | CPU ms/image |", "| --- | --- | --- |"]
        cpu = result.get("input_cpu_ms_per_image", {})
        lines += [f"| {k} | {v:,.0f} | {cpu.get(k, float('nan')):.3f} |" for k, v in result["input"].items()]
    decode = result.get("decode_hw") or {}
    if decode.get("whole") or decode.get("region"):
        loads = sorted(set(decode.get("whole", {})) | set(decode.get("region", {})), key=float)
        lines += ["", "| hw_decoder_load | whole images/s | training regions images/s |", "| --- | --- | --- |"]
        lines += [f"| {load} | {_rate(decode.get('whole', {}).get(load))} | {_rate(decode.get('region', {}).get(load))} |"
                  for load in loads]
    if result.get("train"):
        lines += ["", "| arch | batch | layout | compile | real img/s | synthetic img/s | stall | bound | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["train"]:
            if "real_images_per_s" in r:
                mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") is not None else "-"
                lines.append(f"| {r['arch']} | {r['batch_size']} | {r.get('layout', '-')} | {r['compile']} | "
                             f"{r['real_images_per_s']:,.0f} | {r['synthetic_images_per_s']:,.0f} | "
                             f"{r['stall_fraction']:.1%} | {r.get('bound', '-')} | {mem} |")
            else:
                lines.append(f"| {r['arch']} | {r['batch_size']} | - | {r['compile']} | {r.get('error', '-')} | | | | |")
    keys = ("checkpoint_write_s", "engine_top1", "predict_single_crop_top1", "near_ties", "top1_images_apart",
            "top1_images_allowed", "predict_ten_crop_images_per_s", "nccl")
    lines += [f"\n{key}: {result[key]}" for key in keys if key in result]
    return "\n".join(lines) + "\n"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def save(result: dict, out: Path) -> None:
    for name, text in (("result.json", json.dumps(result, indent=1, default=str) + "\n"), ("RESULT.md", render(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def commit() -> str:
    """The checkout's commit (and '+changes' when its files differ from it), or 'unknown' without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+changes" if dirty else "")) if head else "unknown"


# ------------------------------------------------------------------------------------------ command line
def parse_timeouts(text: str) -> dict[str, int]:
    """'train=900,tests=300' -> {'train': 900, 'tests': 300}; ValueError naming the bad item."""
    found = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"TIMEOUTS item {item!r}: use SECTION=SECONDS with a section of {', '.join(SECTIONS)}")
        found[name] = int(value)
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default=os.environ.get("DEVICE") or "gpu")
    p.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"),
                   help="the profile for a short window (QUICK=1)")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu-check")
    p.add_argument("--sections", default=os.environ.get("SECTIONS") or ",".join(SECTIONS))
    p.add_argument("--timeouts", default=os.environ.get("TIMEOUTS", ""), help="SECTION=SECONDS,... overrides")
    p.add_argument("--profile", help=argparse.SUPPRESS)  # internal, with --section: run one section here
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--section-timeout", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "sections").mkdir(parents=True, exist_ok=True)
    if args.section:
        from benchmarks.gpu_sections import PROFILES

        run_section(args.section, args.device, PROFILES[args.profile], out, args.section_timeout)
        return 0
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"gpu-check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    try:
        overrides = parse_timeouts(args.timeouts)
    except ValueError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    profile = profile_for(args.device, args.quick)
    timeouts = {name: overrides.get(name, profile.timeout(name)) for name in SECTIONS}
    previous = out / "result.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() and len(chosen) < len(SECTIONS) else {}
    if result.get("device") != args.device or result.get("profile", {}).get("name") != profile.name:
        result = {}  # another device's or profile's figures are not kept beside these
    result.update({"device": args.device, "commit": commit(), "sections": result.get("sections", {}),
                   "profile": {"name": profile.name, "timeouts": timeouts, "budget_s": sum(timeouts.values())}})
    print(f"gpu-check: profile {profile.name}, sections {', '.join(chosen)} (at most "
          f"{sum(timeouts[n] for n in chosen)} s); results in {out}", flush=True)
    for name in chosen:
        print(f"gpu-check: {name} (up to {timeouts[name]} s) ...", flush=True)
        supervise(name, args.device, profile, out, timeouts[name], result)
        save(result, out)
        s = result["sections"][name]
        print(f"gpu-check: {name}: {s['status']}" + (f" ({s['error'][:200]})" if s.get("error") else ""), flush=True)
    print(f"gpu-check: results in {out / 'result.json'} and {out / 'RESULT.md'}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
