"""How long does a fault cost? From injecting it to the run named / training again, and the steps lost.

Faults, each injected for real into a small CPU run (se_resnext_tiny, 32 px, 4 ranks = 2 nodes x 2 tasks
under Slurm, 2 local processes without it; the run of tests/test_slurm_jobs.py):

- local, `senet train --nproc 2`: a rank killed (SIGKILL), a rank stopped (SIGSTOP): time until the
  launcher exits 1 with the line naming the rank (there is no "training again" without a scheduler);
- Slurm, the local 4-node cluster (`make slurm-up`): a rank stopped (SIGSTOP); a node lost (its slurmd,
  the job step's slurmstepd and its two ranks SIGKILLed); a preemption on the `cancel` partition
  (PreemptMode=CANCEL: the run submits its own next job) and, for comparison, on `debug`
  (PreemptMode=REQUEUE: Slurm requeues the job): time until the failure is named (RUN/failures.jsonl),
  until the next job is submitted, until it runs, and until it has trained its first step again
  (the first metrics.jsonl row after its resume event), and the steps lost (the last step trained
  before the fault minus the step resumed from).

`train.dist_timeout_s` is 10 s here (the default is 600 s): a stopped rank is named after that much
silence. The local cluster's KillWait=5 s and cred_expire=5 s are shorter than Slurm's defaults (30 s,
121 s); SlurmdTimeout is the default 300 s. The results table says what the defaults would add.

Usage (as root, on a machine where nothing else uses the cluster's ports)::

    make slurm-up && source .slurm-local/env
    python benchmarks/bench_faults.py --json faults.json            # all faults, ~10 min on 2 cores
    python benchmarks/bench_faults.py --only local_kill local_stop  # some of them (no cluster needed)
    make slurm-down

Measures and prints; never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.synthetic import SyntheticSpec, make_synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIST_TIMEOUT_S = 10
CONFIG = f"""\
model: {{arch: se_resnext_tiny, num_classes: 6, channels_last: false}}
data: {{dtype: float32, crop_size: 32, py_workers: 1, threads: 1}}
optim: {{lr: 0.4, reference_batch: 64}}
train: {{device: cpu, epochs: 8, batch_size: 4, seed: 3, precision: fp32, log_every: 1, checkpoint_every: 1000,
        dist_timeout_s: {DIST_TIMEOUT_S}}}
slurm: {{nodes: 2, gpus_per_node: 2, cpus_per_task: 1, time_min: 30, signal_delay_s: 30, exclusive: false}}
"""
STEPS_PER_EPOCH = 6
POLL_S = 0.1
TIMEOUT_S = 300
SCENARIOS = ("local_kill", "local_stop", "slurm_stop", "slurm_node", "slurm_cancel", "slurm_requeue")


# ------------------------------------------------------------------------------------------ helpers
def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


def wait(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(POLL_S)
    return value


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir) if "loss" in r), default=0)


def trained_after_resume(run_dir: Path, resumes_before: int) -> int | None:
    """The step of the first training row after the (resumes_before + 1)-th resume event, once there is one."""
    seen = 0
    for r in rows(run_dir):
        if r.get("event") == "resume":
            seen += 1
        elif seen > resumes_before and "loss" in r:
            return r["step"]
    return None


def resume_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rows(run_dir) if r.get("event") == "resume"]


def beat(run_dir: Path, rank: int, job_id: str | None = None) -> dict | None:
    """The heartbeat of `rank` (of a task of `job_id` under Slurm)."""
    for path in run_dir.glob(f"health/*/rank-{rank}.json"):
        try:
            b = json.loads(path.read_text())
            environ = Path(f"/proc/{b['pid']}/environ").read_bytes()
        except (OSError, ValueError):
            continue
        if job_id is None or f"SLURM_JOB_ID={job_id}\0".encode() in environ:
            return b
    return None


def job_of(run_dir: Path) -> str:
    return str(json.loads((run_dir / "job.json").read_text())["job_id"])


def state(job_id: str) -> str:
    return run("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------------------- scenarios
def local(work: Path, config: Path, sig: signal.Signals) -> dict[str, Any]:
    out = work / f"local-{sig.name}"
    sets = [f"data.root={work / 'data'}", f"data.cache_dir={work / 'cache'}", "train.epochs=50"]
    proc = subprocess.Popen([sys.executable, "-m", "senet", "train", str(config), "--nproc", "2", "--out", str(out),
                             *[a for s in sets for a in ("--set", s)]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait(lambda: last_step(out) >= 6, "6 local steps")
    victim = wait(lambda: beat(out, 1), "rank 1's heartbeat")
    before = last_step(out)
    os.kill(victim["pid"], sig)
    t0 = time.monotonic()
    text, _ = proc.communicate(timeout=TIMEOUT_S)
    named_s = time.monotonic() - t0
    return {"fault": f"local rank {sig.name}", "named_s": round(named_s, 1), "exit": proc.returncode,
            "line": text.strip().splitlines()[-1], "step_at_fault": before}


def submit(work: Path, config: Path, *extra: str) -> tuple[str, Path]:
    answer = work / f"submit-{time.monotonic_ns()}.json"
    run(sys.executable, "-m", "senet", "submit", str(config), "--out", str(work / "runs"), "--json", str(answer), *extra)
    info = json.loads(answer.read_text())
    return info["job_id"], Path(info["run_dir"])


class Peak:
    """The highest step trained before the fault's resume, as metrics.jsonl showed it over time (the next job's
    resume drops the rows after its checkpoint, then writes its resume event)."""

    def __init__(self, run_dir: Path, resumes_before: int) -> None:
        self.run_dir, self.resumes_before, self.step = run_dir, resumes_before, last_step(run_dir)

    def __call__(self, condition: Callable[[], Any]) -> Callable[[], Any]:
        def watched() -> Any:
            seen = 0
            for r in rows(self.run_dir):
                seen += r.get("event") == "resume"
                if seen > self.resumes_before:
                    break
                if "loss" in r:
                    self.step = max(self.step, r["step"])
            return condition()
        return watched


def follow(run_dir: Path, old: str, t0: float, resumes_before: int, peak: Peak, failure: bool,
           requeue: bool) -> dict[str, Any]:
    """Times from t0: failure named, next job submitted (or this one requeued), running, trained again."""
    out: dict[str, Any] = {}
    if failure:
        wait(peak(lambda: records(run_dir)), "the failure named")
        out["named_s"] = round(time.monotonic() - t0, 1)
    if requeue:
        new = old
        wait(peak(lambda: "Restarts=1" in run("scontrol", "show", "job", old)), f"job {old} requeued")
    else:
        new = wait(peak(lambda: (j := job_of(run_dir)) != old and j), "the next job submitted")
    out["submitted_s"] = round(time.monotonic() - t0, 1)
    wait(peak(lambda: state(new) == "RUNNING"), f"job {new} running")
    out["running_s"] = round(time.monotonic() - t0, 1)
    wait(peak(lambda: trained_after_resume(run_dir, resumes_before)), f"job {new} training again")
    out["training_s"] = round(time.monotonic() - t0, 1)
    out["new_job"] = new
    return out


NAMES = {"slurm_stop": "Slurm: a rank stopped (SIGSTOP)", "slurm_node": "Slurm: a node lost (slurmd, step, ranks SIGKILLed)",
         "slurm_cancel": "Slurm: preempted on a CANCEL partition", "slurm_requeue": "Slurm: preempted on a REQUEUE partition"}


def slurm_fault(work: Path, config: Path, kind: str) -> dict[str, Any]:
    partition = "cancel" if kind == "slurm_cancel" else "debug"
    job_id, run_dir = submit(work, config, "--partition", partition)
    try:
        wait(lambda: last_step(run_dir) >= STEPS_PER_EPOCH + 2, f"job {job_id} past its first checkpoint")
        resumes = len(resume_steps(run_dir))
        killed: list[int] = []
        if kind == "slurm_stop":
            victim = wait(lambda: beat(run_dir, 3, job_id), "rank 3's heartbeat")
            os.kill(victim["pid"], signal.SIGSTOP)
        elif kind == "slurm_node":
            ranks = [wait(lambda r=r: beat(run_dir, r, job_id), f"rank {r}'s heartbeat") for r in (2, 3)]
            stepd = int(run("ps", "-o", "ppid=", "-p", str(ranks[0]["pid"])))
            slurmd = int((ROOT / ".slurm-local" / "run" / f"slurmd-{ranks[0]['node']}.pid").read_text())
            killed = [slurmd, stepd, *(r["pid"] for r in ranks)]
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        else:
            nodes = run("squeue", "-h", "-j", job_id, "-o", "%N").strip()
            run("sbatch", "--parsable", "--partition=urgent", "--nodes=2", f"--nodelist={nodes}", "--exclusive",
                "--output=/dev/null", "--job-name=urgent-bench", "--wrap", "sleep 1")
        t0 = time.monotonic()
        peak = Peak(run_dir, resumes)
        try:
            times = follow(run_dir, job_id, t0, resumes, peak, failure=kind in ("slurm_stop", "slurm_node"),
                           requeue=kind == "slurm_requeue")
        finally:
            if killed:
                subprocess.run(["make", "-s", "slurm-up"], cwd=ROOT, capture_output=True)  # the lost node back
        resumed = resume_steps(run_dir)[resumes]
        return {"fault": NAMES[kind], "job": job_id, **times, "last_step_before": peak.step, "resumed_from": resumed,
                "steps_lost": peak.step - resumed, "records": records(run_dir)}
    finally:
        for job in json.loads((run_dir / "job.json").read_text()).get("jobs", [job_id]):
            subprocess.run(["scancel", str(job)], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_faults-"))
    make_synthetic(work / "data", SyntheticSpec(classes=6, train_per_class=16, val_per_class=4, test=0, seed=1,
                                                min_side=40, max_side=64))
    config = work / "bench_faults.yaml"
    config.write_text(CONFIG.replace("data: {", f"data: {{root: {work / 'data'}, cache_dir: {work / 'cache'}, "))
    results = []
    for kind in args.only:
        print(f"== {kind}", flush=True)
        if kind.startswith("local_"):
            result = local(work, config, signal.SIGKILL if kind == "local_kill" else signal.SIGSTOP)
        else:
            result = slurm_fault(work, config, kind)
        print(json.dumps({k: v for k, v in result.items() if k != "records"}), flush=True)
        results.append(result)
    model = [line.split(":", 1)[1].strip() for line in run("lscpu").splitlines() if line.startswith("Model name")]
    machine = {"cpu": model[0] if model else platform.machine(), "cores": os.cpu_count(),
               "load_average": [round(x, 2) for x in os.getloadavg()], "dist_timeout_s": DIST_TIMEOUT_S}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
