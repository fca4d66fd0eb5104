"""`make gpu-check` tells the truth, fits a short window, and runs where a GPU node's bare interpreter is all
there is; `make install` puts exactly one DALI into an environment.

On this machine without a GPU, `DEVICE=cpu` runs the same sections with small sizes: the `gpu`-marked tests
on the CPU device, every input stage, whole-image and region decoding, bench-train (eager and compiled), a
2-rank run, train + predict. It runs with submitit, tensorboard, matplotlib and tqdm made unimportable,
as on a node with only torch, DALI, numpy, pillow, scipy, pyyaml and pytest. A failing GPU test planted in
a copy of the checkout, and a copy with no GPU test at all, must each turn the tests section red.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from benchmarks.gpu_sections import OPTIONAL_PACKAGES, PROFILES, QUICK_BUDGET_S, SECTIONS, profile_for

ROOT = Path(__file__).resolve().parents[1]
# What the README's GPU section says a node's interpreter needs (distribution names; DALI in any flavour).
BARE_INTERPRETER = {"torch", "numpy", "pillow", "scipy", "pyyaml", "pytest"}
BLOCKER = '''"""Hides some installed top-level packages from every interpreter started with this folder first on
PYTHONPATH, as if they were not installed: `import` fails and importlib.util.find_spec answers None."""
import sys
from importlib.machinery import PathFinder

ABSENT = frozenset({names!r})


class PathFinderWithout(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in ABSENT else super().find_spec(name, path, target)


sys.meta_path[:] = [PathFinderWithout if finder is PathFinder else finder for finder in sys.meta_path]
'''


def declared_packages() -> set[str]:
    """Every distribution pyproject.toml names: dependencies and all extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in requirements}


def bare_interpreter(folder: Path, absent: list[str] | None = None) -> dict[str, str]:
    """An environment whose Python cannot import `absent` (default: senet's packages beyond the bare list):
    a sitecustomize shim, first on PYTHONPATH."""
    if absent is None:
        absent = sorted(p for p in declared_packages() - BARE_INTERPRETER if not p.startswith("nvidia-dali"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(names=absent))
    env = {**os.environ, "PYTHONPATH": str(folder)}
    for name in absent:  # the shim really takes effect, and an absent package looks absent
        probe = subprocess.run([sys.executable, "-c", f"import importlib.util as u; assert u.find_spec({name!r}) is None; "
                                f"import {name}"], env=env, capture_output=True, text=True)
        assert f"ModuleNotFoundError: No module named {name!r}" in probe.stderr, (name, probe.stderr)
    return env


def gpu_check(*settings: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", *settings], cwd=cwd,
                          env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found[int(entry.name)] = cmdline
    return found


def test_the_bare_list_is_senets_dependencies_less_the_optional_ones() -> None:
    """The packages gpu-check reports as optional are exactly those pyproject.toml adds to the README's list."""
    beyond = {p for p in declared_packages() - BARE_INTERPRETER if not p.startswith("nvidia-dali")}
    assert beyond == set(OPTIONAL_PACKAGES)


def test_the_quick_profile_fits_a_short_window() -> None:
    """A borrowed node may give 15 minutes in all, start and transfers included: every section of the quick
    profile ends within its timeout, and the timeouts add up to 6.5 minutes."""
    quick, full = PROFILES["quick"], PROFILES["full"]
    assert sum(quick.timeout(s) for s in SECTIONS) == QUICK_BUDGET_S <= 6.5 * 60
    assert profile_for("gpu", quick=True) is quick and profile_for("gpu", quick=False) is full
    assert {(r.arch, r.compiled) for r in quick.train_runs} == {("se_resnext50_32x4d", False), ("resnet50", False)}
    assert any(r.compiled for r in full.train_runs) and full.timeout("train") > quick.timeout("train")
    assert all(p.timeout(s) > 0 for p in PROFILES.values() for s in SECTIONS)


def test_install_picks_one_dali_for_the_machine() -> None:
    """DALI comes from either/or extras, and `make install` (read with make -n, nothing run) takes one per
    CUDA major with the matching torch, removing the other flavour first; a CPU machine gets cuda12's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if r.startswith("nvidia-dali")]
    extras = project["optional-dependencies"]
    dali = {name: [r for r in reqs if r.startswith("nvidia-dali")] for name, reqs in extras.items()}
    assert {k: [r.split(">")[0] for r in v] for k, v in dali.items() if v} == {
        "cuda12": ["nvidia-dali-cuda120"], "cuda13": ["nvidia-dali-cuda130"]}
    for cuda, extra, torch_index, other in (("", "cuda12", None, "nvidia-dali-cuda130"),
                                            ("12", "cuda12", "cu128", "nvidia-dali-cuda130"),
                                            ("13", "cuda13", "cu130", "nvidia-dali-cuda120")):
        plan = subprocess.run(["make", "-n", "-B", "install", f"CUDA={cuda}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        installs = [line for line in plan.splitlines() if "pip install" in line and "-e " in line]
        assert len(installs) == 1 and f"[test,tensorboard,{extra}]" in installs[0], plan
        torch_line = next(line for line in plan.splitlines() if "pip install" in line and "torch==" in line)
        assert (torch_index or "index-url") in torch_line if torch_index else "index-url" not in torch_line
        uninstall = plan.index(f"pip uninstall -q -y {other}")
        assert uninstall < plan.index(installs[0])  # the other flavour goes first: both write nvidia/dali/
    wrong = subprocess.run(["make", "-n", "install", "CUDA=11"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode != 0 and "CUDA=11" in wrong.stderr


def test_without_dali_senet_names_the_extra_to_install(tmp_path: Path) -> None:
    """`pip install senet` without an extra has no DALI: one line saying which to install, exit 1."""
    env = bare_interpreter(tmp_path / "no_dali", ["nvidia"])
    env["PYTHONPATH"] += os.pathsep + str(ROOT)
    done = subprocess.run([sys.executable, "-m", "senet", "bench-input", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "NVIDIA DALI is not installed" in done.stderr and "make install CUDA=12" in done.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_section_in_a_bare_interpreter_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = bare_interpreter(tmp_path / "bare")
    proc = subprocess.Popen(["make", "-s", "gpu-check", "DEVICE=cpu", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows_while_running = 0  # train rows visible in result.json while the train section still runs
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            snapshot = json.loads((out / "result.json").read_text())
        except (OSError, ValueError):
            snapshot = {}
        if snapshot.get("sections", {}).get("train", {}).get("status") == "running":
            rows_while_running = max(rows_while_running, len(snapshot.get("train", [])))
        time.sleep(0.2)
    log = proc.communicate(timeout=60)[0]
    result = json.loads((out / "result.json").read_text())
    assert proc.returncode == 0, log[-3000:] + json.dumps(result["sections"])
    assert [s["status"] for s in result["sections"].values()] == ["ok"] * len(SECTIONS), result["sections"]
    assert rows_while_running == 1  # the eager row was written before the compiled run ended

    m = result["machine"]
    assert result["device"] == "cpu" and result["profile"]["name"] == "cpu" and result["commit"]
    assert {"card", "driver", "cuda", "torch", "dali"} <= m.keys() and m["torch"] and m["dali"] and m["card"]
    assert len(m["dali_distributions"]) == 1 and m["shm_gib"] > 0
    assert m["optional"] == {name: None for name in OPTIONAL_PACKAGES}  # the bare interpreter really was bare
    assert result["tests"]["passed"] >= 1 and result["tests"]["failed"] == 0
    assert set(result["input"]) == {"read", "decode", "crop_flip", "full"} and all(v > 0 for v in result["input"].values())
    assert result["input_setup"]["shm_needed_mib"] >= 0
    assert set(result["decode_hw"]) == {"whole", "region"}
    assert all(set(rates) == {"0.0", "0.65", "1.0"} and min(rates.values()) > 0 for rates in result["decode_hw"].values())
    eager, compiled = result["train"]
    assert eager["compile"] is False and eager["real_images_per_s"] > 0 and 0 <= eager["stall_fraction"] <= 1
    assert eager["layout"] == "NCHW" and eager["channels_last"] is False  # data.layout auto on the CPU
    assert compiled["compile"] is True or str(compiled["compile"]).startswith("unavailable")
    assert result["checkpoint_write_s"] > 0 and result["predict_ten_crop_images_per_s"] > 0
    assert result["predict_single_crop_top1"] == result["engine_top1"] and result["top1_images_allowed"] == 0
    assert result["curves_png"] is False  # no matplotlib: `senet train` skipped its curves, saying so once
    assert (out / "train_run.log").read_text().count("no curves.png: matplotlib is not installed") == 1
    assert (out / "RESULT.md").read_text().startswith("# gpu-check on ")

    before = result["sections"]["train"]
    done = gpu_check("DEVICE=cpu", f"GPU_CHECK_OUT={out}", "SECTIONS=env", env=env, timeout=300)
    again = json.loads((out / "result.json").read_text())
    assert done.returncode == 0 and again["sections"]["train"] == before and again["train"] == result["train"]
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out)]
    for bad, words in (("--sections=warp", "unknown section"), ("--timeouts=train=soon", "TIMEOUTS item 'train=soon'")):
        refused = subprocess.run([*script, bad], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr

    # A section out of time is ended with everything it started and says so: the train section stops its own
    # bench-train (and its DALI workers) at the section's deadline; the runner kills a section that overruns.
    # The slow-rank test hook makes every bench-train step sleep 5 s, so the run is surely still going at the
    # train section's deadline, however fast the machine.
    slow = {**os.environ, "SENET_TEST_SLOW_RANK": "0:5"}
    late = subprocess.run([*script, "--sections=train", "--timeouts=train=12"], capture_output=True, text=True,
                          timeout=120, env=slow)
    cut = json.loads((out / "result.json").read_text())["sections"]["train"]
    assert late.returncode == 1 and cut["status"] == "timeout" and "the section's time ran out" in cut["error"], cut
    time.sleep(1)
    assert not processes_mentioning(str(out)), processes_mentioning(str(out))

    # A section that hangs (its process stopped as soon as it exists: the CPU profile's input section can finish
    # within any short timeout) is killed by the runner at its timeout, with whatever it started.
    runner = subprocess.Popen([*script, "--sections=input", "--timeouts=input=3"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    section_cmd, hung = f"--out {out} --section input", {}
    while runner.poll() is None and not (hung := processes_mentioning(section_cmd)):
        time.sleep(0.01)
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    runner.communicate(timeout=120)
    cut = json.loads((out / "result.json").read_text())["sections"]["input"]
    assert hung and runner.returncode == 1 and cut["status"] == "timeout" and "timed out after 3 s" in cut["error"], cut
    time.sleep(1)
    assert not processes_mentioning(str(out)), processes_mentioning(str(out))


@pytest.mark.slow
def test_a_failing_gpu_test_or_none_run_turns_the_tests_section_red(tmp_path: Path) -> None:
    """A copy of the checkout whose only GPU tests are planted: one passes and one fails, then one is skipped."""
    copy, out = tmp_path / "checkout", tmp_path / "check"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "tests/test_gpu.py":
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    planted = copy / "tests" / "test_planted.py"
    header = "import pytest\n\npytestmark = pytest.mark.gpu\n\n\n"
    planted.write_text(header + "def test_fine() -> None:\n    assert 1 + 1 == 2\n\n\n"
                       "def test_planted_failure() -> None:\n    assert 1 + 1 == 3, 'planted'\n")
    settings = ("DEVICE=cpu", "QUICK=1", f"GPU_CHECK_OUT={out}", "SECTIONS=tests")
    done = gpu_check(*settings, cwd=copy)
    result = json.loads((out / "result.json").read_text())
    assert done.returncode != 0 and result["sections"]["tests"]["status"] == "failed", done.stdout + done.stderr
    assert (result["tests"]["passed"], result["tests"]["failed"]) == (1, 1) and result["profile"]["name"] == "cpu-quick"
    assert result["tests"]["failed_names"] == ["tests.test_planted::test_planted_failure"]
    assert result["sections"]["tests"]["error"].startswith("1 of 2 GPU tests failed")

    planted.write_text(header + "def test_needs_a_gpu() -> None:\n    pytest.skip('no GPU here')\n")
    done = gpu_check(*settings, cwd=copy)
    result = json.loads((out / "result.json").read_text())
    assert done.returncode != 0 and result["sections"]["tests"]["status"] == "failed"
    assert result["tests"]["passed"] == 0 and "no GPU test ran (1 skipped: no GPU here)" in result["sections"]["tests"]["error"]
