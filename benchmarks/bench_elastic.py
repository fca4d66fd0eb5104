"""The paper's 4 x 8 shape rehearsed on the local Slurm cluster: what grows with the rank count.

A run starts as N nodes x 8 tasks (32 CPU ranks by default: se_resnext_tiny, 32 px synthetic images,
`data.py_workers=0`, 2 images per rank), rendezvouses, is preempted once by the `urgent` partition
(PreemptMode=REQUEUE: Slurm signals it, it checkpoints, Slurm requeues it), resumes, is cancelled (SIGTERM:
a checkpoint at the next agreement), and is continued with `senet submit --resume RUN --nodes N/2` on half
the processes, each hosting two of the run's virtual ranks, to the end of its epochs. Then the same for a
smaller starting shape (1 x 8, continued as 1 x 4), so that the numbers show how they scale.

Checked: RUN/shapes.jsonl has one row per start (N x 8, N x 8 again after the requeue, N/2 x 8) with the
same virtual ranks and global batch; metrics.jsonl's steps run 1..T without gaps and its LR is the
schedule's at every step (`training.optim.LRSchedule` of the run's global batch); optionally the final
weights against an uninterrupted `senet train --nproc 8` of the same recipe (same virtual ranks).

Measured from outside the ranks, per rank and per phase (from the process's start until rank 0 logs the
attempt's first step; and the whole attempt):

- every open, read, connect and socket send/receive, by `strace -f -ff -yy -ttt` attached to each node's
  slurmd (so every job step, task and thread it forks is followed; a thread is mapped to its process
  through the clone calls): file opens (and failed opens: Python's import path search), bytes read by
  kind of file (code: interpreter, venv and the run's code snapshot; data; data index; checkpoints; run
  folder; system), TCP connections made, and rendezvous round trips: requests sent on the TCPStore
  client socket (the port every rank connects to first) and answers read from it;
- /proc/<pid>/io (rchar, read_bytes) and /proc/<pid>/status (VmHWM: peak RSS) sampled every 0.25 s by a
  watcher thread, each process matched to its rank by SLURM_PROCID / SLURM_RESTART_COUNT in
  /proc/<pid>/environ.

strace stops every syscall of the traced processes (`-p` cannot use seccomp filtering), so wall times
under it are slower than untraced ones; all wall times are facts of this shared 2-core host only, never a
projection. `--no-trace` runs the rehearsal with the /proc watcher alone.

The local cluster is started here (slurm/cluster/up.sh, GraceTime raised to 60 s: 32 ranks on 2 cores need
more than the default 10 s to reach their checkpoint after the preemption signal) while holding
/tmp/senet-slurm.lock (fcntl), and always stopped again.

Usage (as root)::

    python benchmarks/bench_elastic.py                      # 4x8 -> 2x8 and 1x8 -> 1x4, ~15 min
    python benchmarks/bench_elastic.py --shapes 4x8:2x8 --no-trace --json /tmp/e.json --md /tmp/e.md

Measures, checks and prints; the rehearsal's checks are reported, never asserted.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.synthetic import SyntheticSpec, make_synthetic  # noqa: E402
from training.config import load_config  # noqa: E402
from training.optim import LRSchedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/senet-slurm.lock")
GRACE_TIME_S = 60
BATCH = 2  # images per virtual rank
SAMPLES_PER_EPOCH = 256
EPOCHS = 3
CONFIG = """\
model: {{arch: se_resnext_tiny, num_classes: 6, channels_last: false}}
data: {{root: {data}, cache_dir: {cache}, dtype: float32, crop_size: 32, py_workers: 0, threads: 1,
        samples_per_epoch: {samples}}}
optim: {{lr: 0.4, reference_batch: 64, warmup_epochs: 1, schedule: cosine}}
train: {{device: cpu, epochs: {epochs}, batch_size: {batch}, seed: 3, precision: fp32, log_every: 1,
        checkpoint_every: 2, torch_threads: 1}}
slurm: {{nodes: 1, gpus_per_node: 8, cpus_per_task: 1, time_min: 60, signal_delay_s: 60, exclusive: false}}
"""
POLL_S = 0.25
JOB_TIMEOUT_S = 900
MIN_AVAILABLE_MIB = 1500  # below this much free memory the rehearsal stops its jobs (the host is shared)
TRACED = "execve,clone,clone3,fork,vfork,open,openat,read,pread64,readv,connect,sendto,recvfrom,sendmsg,recvmsg,write,writev"


# ------------------------------------------------------------------------------------------ helpers
def sh(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout, env=env).stdout


def wait(condition: Callable[[], Any], what: str, timeout: float = JOB_TIMEOUT_S, abort: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if (why := abort()):
            raise RuntimeError(f"stopped while waiting for {what}: {why}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(POLL_S)
    return value


def read_rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


@dataclass(frozen=True)
class Shape:
    nodes: int
    tasks: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        nodes, tasks = text.lower().split("x")
        return cls(int(nodes), int(tasks))

    @property
    def world(self) -> int:
        return self.nodes * self.tasks

    def __str__(self) -> str:
        return f"{self.nodes}x{self.tasks}"


def is_python(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python")
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ watcher
@dataclass
class Proc:
    """A rank's process as the watcher saw it."""

    pid: int
    job: str
    attempt: int  # SLURM_RESTART_COUNT + 1
    rank: int
    node: str
    first_seen: float
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (time, io + VmHWM + VmRSS)


class Watcher(threading.Thread):
    """Samples the ranks' /proc files, the host's free memory and the run's metrics.jsonl every POLL_S."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: set[str] = set()
        self.run_dir: Path | None = None
        self.procs: dict[int, Proc] = {}
        self.marks: list[tuple[float, int, bool]] = []  # (time, resume events, a training row after the last)
        self.min_available = mem_available_mib()
        self.peak_total_rss_mib = 0.0
        self.low_memory = ""
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception as e:  # a sample must never end the watcher
                print(f"watcher: {e!r}", flush=True)
            time.sleep(POLL_S)

    def sample(self) -> None:
        now = time.time()
        available = mem_available_mib()
        self.min_available = min(self.min_available, available)
        if available < MIN_AVAILABLE_MIB:
            self.low_memory = f"only {available} MiB of memory left on the host"
        total_rss = 0
        with self.lock:
            jobs = set(self.jobs)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if pid not in self.procs:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if (env.get("SLURM_JOB_ID") not in jobs or b"submitit.core._submit" not in cmdline
                            or self.run_dir is None or str(self.run_dir).encode() not in cmdline):
                        continue  # not a task of this run (another cluster's leftover has the same job ids)
                    parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                    if not is_python(pid) or is_python(int(parent)):
                        continue  # srun's command line names the module too; a rank's own children are not ranks
                    self.procs[pid] = Proc(pid, env["SLURM_JOB_ID"], int(env.get("SLURM_RESTART_COUNT", "0")) + 1,
                                           int(env["SLURM_PROCID"]), env.get("SLURMD_NODENAME", ""), now)
                values = {}
                for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                    name, value = line.split(":")
                    values[name] = int(value)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        values[line.split(":")[0]] = int(line.split()[1])  # kB
                self.procs[pid].samples.append((now, values))
                total_rss += values.get("VmRSS", 0)
            except (OSError, ValueError, KeyError):
                continue  # gone, or not ours
        self.peak_total_rss_mib = max(self.peak_total_rss_mib, total_rss / 1024)
        if self.run_dir is not None:
            rows = read_rows(self.run_dir / "metrics.jsonl")
            resumes = [i for i, r in enumerate(rows) if r.get("event") == "resume"]
            after = resumes[-1] if resumes else -1
            self.marks.append((now, len(resumes), any("loss" in r for r in rows[after + 1:])))

    def first_step_logged(self, resumes: int, after: float) -> float | None:
        """When rank 0 had logged the first step after `resumes` resume events, seen after time `after`."""
        return next((t for t, n, trained in self.marks if t > after and n == resumes and trained), None)


# ------------------------------------------------------------------------------------------- strace
@dataclass
class Usage:
    """What a set of threads did, from their strace lines, in one time window."""

    opens: int = 0
    failed_opens: int = 0
    read_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opened: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    connects: int = 0
    dns_queries: int = 0
    store_requests: int = 0
    store_answers: int = 0
    store_round_trips: int = 0
    socket_received: int = 0
    socket_sent: int = 0


LINE = re.compile(r"^(\d+\.\d+) (\w+)\((.*)\) += (-?\d+|\?)")
FD = re.compile(r"^(\d+)<(.*?)>(?:, |$)")
REMOTE_PORT = re.compile(r":(\d+)\]$")  # TCP:[a:p->b:q] and TCPv6:[[::ffff:a]:p->[::ffff:b]:q]
PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
OPENED = re.compile(r'"([^"]*)"')


class Trace:
    """`strace -f -ff` attached to every slurmd: one file per thread, parsed once the jobs are over."""

    def __init__(self, folder: Path, slurmd_pids: list[int]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.procs = [subprocess.Popen(["strace", "-f", "-ff", "-ttt", "-yy", "-s", "0", "-e", f"trace={TRACED}",
                                        "-o", str(folder / "t"), "-p", str(pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for pid in slurmd_pids]
        time.sleep(1.0)  # attached
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"strace could not attach: {p.stderr.read().decode()[-300:]}")

    def detach(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # strace detaches and leaves the tracees running
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()

    def threads_of(self) -> dict[int, int]:
        """thread id -> process id, from the clone calls (a thread's creator's process; a process is its own)."""
        parent: dict[int, tuple[int, bool]] = {}
        for path in self.folder.glob("t.*"):
            tid = int(path.suffix[1:])
            with open(path, errors="replace") as f:
                for line in f:
                    m = LINE.match(line)
                    if m and m.group(2) in ("clone", "clone3", "fork", "vfork") and m.group(4) not in ("?", "-1"):
                        child = int(m.group(4))
                        if child > 0:
                            parent[child] = (tid, "CLONE_THREAD" in m.group(3))
        tgid: dict[int, int] = {}

        def resolve(tid: int) -> int:
            if tid not in tgid:
                creator, thread = parent.get(tid, (tid, False))
                tgid[tid] = resolve(creator) if thread and creator != tid else tid
            return tgid[tid]

        for path in self.folder.glob("t.*"):
            resolve(int(path.suffix[1:]))
        return tgid

    def usage(self, tids: list[int], windows: list[tuple[str, float, float]], kind: Callable[[str], str]) -> dict[str, Usage]:
        """Each window's Usage over these threads; the store port is the one the process first connects to."""
        out = {name: Usage() for name, _, _ in windows}
        lines: list[tuple[float, str, str, str]] = []
        for tid in tids:
            path = self.folder / f"t.{tid}"
            if not path.exists():
                continue
            with open(path, errors="replace") as f:
                for line in f:
                    m = LINE.match(line)
                    if m:
                        lines.append((float(m.group(1)), m.group(2), m.group(3), m.group(4)))
        lines.sort(key=lambda x: x[0])
        store_port = next((p.group(1) for t, name, args, ret in lines if name == "connect" and args.split("<", 1)[-1]
                           .startswith("TCP") and (p := PORT.search(args))), None)
        last_on_store = ""
        for t, name, args, ret in lines:
            hits = [out[w] for w, start, end in windows if start <= t <= end]
            if not hits:
                continue
            value = int(ret) if ret != "?" else -1
            fd = FD.match(args)
            target = fd.group(2) if fd else ""
            remote = REMOTE_PORT.search(target) if target.startswith("TCP") else None
            on_store = bool(remote and store_port and remote.group(1) == store_port)
            for u in hits:
                if name in ("open", "openat"):
                    path = OPENED.search(args)
                    if value >= 0:
                        u.opens += 1
                        u.opened[kind(path.group(1) if path else "")] += 1
                    else:
                        u.failed_opens += 1
                elif name == "connect" and args.split("<", 1)[-1].startswith("TCP"):
                    u.connects += 1
                elif name in ("sendto", "sendmsg") and target.startswith("UDP") and target.endswith(":53]"):
                    u.dns_queries += 1
                elif value > 0 and name in ("read", "pread64", "readv", "recvfrom", "recvmsg"):
                    if target.startswith(("TCP", "UDP", "UNIX", "socket")):
                        u.socket_received += value
                        if on_store and name in ("recvfrom", "read", "recvmsg"):
                            u.store_answers += 1
                            if last_on_store == "send":
                                u.store_round_trips += 1
                    elif target.startswith("/"):
                        u.read_bytes[kind(target)] += value
                elif value > 0 and name in ("write", "writev", "sendto", "sendmsg") and target.startswith(("TCP", "UNIX")):
                    u.socket_sent += value
                    if on_store:
                        u.store_requests += 1
            if on_store and value > 0:
                last_on_store = "send" if name in ("write", "writev", "sendto", "sendmsg") else "recv"
        return out


# ----------------------------------------------------------------------------------------- the rehearsal
class Cluster:
    """The local Slurm cluster of this checkout, started and stopped here (the caller holds LOCK)."""

    def __init__(self) -> None:
        env = dict(os.environ, SENET_SLURM_GRACE_TIME=str(GRACE_TIME_S))
        subprocess.run([str(ROOT / "slurm/cluster/down.sh")], capture_output=True, env=env)  # a stale one: wiped
        up = subprocess.run([str(ROOT / "slurm/cluster/up.sh")], capture_output=True, text=True, env=env)
        if up.returncode:
            raise RuntimeError(f"slurm/cluster/up.sh failed ({up.returncode}): {up.stdout[-1000:]} {up.stderr[-2000:]}")
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        for line in (ROOT / ".slurm-local" / "env").read_text().splitlines():
            if line.startswith("export "):
                name, value = line[len("export "):].split("=", 1)
                self.env[name] = value.strip('"')

    def slurmd_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted((ROOT / ".slurm-local" / "run").glob("slurmd-*.pid"))]

    def run(self, *args: str) -> str:
        return sh(*args, env=self.env)

    def state(self, job: str) -> str:
        return self.run("squeue", "-h", "-j", job, "-o", "%T").strip()

    def sacct(self, job: str) -> list[str]:
        return [line.split()[0] for line in self.run("sacct", "-n", "-X", "-P", "--duplicates", "-j", job,
                                                     "-o", "State").splitlines() if line.strip()]

    @staticmethod
    def down() -> None:
        subprocess.run([str(ROOT / "slurm/cluster/down.sh")], capture_output=True)


def senet(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "senet", *args], capture_output=True, text=True, env=cluster.env,
                          timeout=600)


def rehearse(cluster: Cluster, watcher: Watcher, work: Path, config: Path, start: Shape, then: Shape,
             trace: Trace | None) -> dict[str, Any]:
    """start -> preempted, requeued, resumed -> cancelled -> `senet submit --resume --nodes` on `then` -> done."""
    answer = work / f"submit-{start}.json"
    done = senet(cluster, "submit", str(config), "--out", str(work / "runs"), "--json", str(answer), "--partition", "debug",
                 "--set", f"slurm.nodes={start.nodes}", "--set", f"slurm.gpus_per_node={start.tasks}")
    if done.returncode:
        raise RuntimeError(f"senet submit: {done.stdout[-500:]} {done.stderr[-1500:]}")
    info = json.loads(answer.read_text())
    job, run_dir = str(info["job_id"]), Path(info["run_dir"])
    with watcher.lock:
        watcher.jobs.add(job)
    watcher.run_dir, watcher.marks = run_dir, []
    times: dict[str, float] = {"submitted": time.time()}
    abort = lambda: watcher.low_memory  # noqa: E731
    metrics = run_dir / "metrics.jsonl"
    trained = lambda n: max((r["step"] for r in read_rows(metrics) if "loss" in r), default=0) >= n  # noqa: E731
    print(f"[{start}] job {job}: {run_dir}", flush=True)
    try:
        wait(lambda: cluster.state(job) == "RUNNING", f"job {job} running", abort=abort)
        times["running"] = time.time()
        wait(lambda: trained(3), f"job {job} training 3 steps", abort=abort)
        times["trained"] = time.time()
        nodes = cluster.run("squeue", "-h", "-j", job, "-o", "%N").strip()
        urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", f"--nodes={start.nodes}", f"--nodelist={nodes}",
                             "--exclusive", "--output=/dev/null", "--job-name=urgent-bench-elastic", "--wrap",
                             "sleep 1").strip()
        times["preempted"] = time.time()
        print(f"[{start}] preempted by job {urgent} on {nodes}", flush=True)
        wait(lambda: "Restarts=1" in cluster.run("scontrol", "show", "job", job), f"job {job} requeued", abort=abort)
        wait(lambda: cluster.state(job) == "RUNNING", f"job {job} running again", abort=abort)
        times["running_again"] = time.time()
        wait(lambda: (rows := read_rows(metrics)) and any(r.get("event") == "resume" for r in rows) and
             max(r["step"] for r in rows if "loss" in r) >= 2 + next(r["step"] for r in rows if r.get("event") == "resume"),
             f"job {job} training after its resume", abort=abort)
        times["trained_again"] = time.time()
        cluster.run("scancel", job)  # SIGTERM: every rank checkpoints at the next agreement and leaves
        wait(lambda: not cluster.state(job), f"job {job} leaving the queue", abort=abort)
        times["cancelled"] = time.time()
        print(f"[{start}] cancelled; continuing as {then}", flush=True)

        answer2 = work / f"resume-{start}.json"
        done = senet(cluster, "submit", "--resume", str(run_dir), "--nodes", str(then.nodes), "--gpus-per-node",
                     str(then.tasks), "--json", str(answer2))
        if done.returncode:
            raise RuntimeError(f"senet submit --resume: {done.stdout[-500:]} {done.stderr[-1500:]}")
        said = done.stdout.strip()
        job2 = str(json.loads(answer2.read_text())["job_id"])
        with watcher.lock:
            watcher.jobs.add(job2)
        times["resubmitted"] = time.time()
        wait(lambda: not cluster.state(job2), f"job {job2} finishing", abort=abort)
        times["finished"] = time.time()
    finally:
        for j in json.loads((run_dir / "job.json").read_text()).get("jobs", [job]):
            subprocess.run(["scancel", str(j)], capture_output=True, env=cluster.env)
    time.sleep(2 * POLL_S)
    return {"start": str(start), "then": str(then), "job": job, "job2": job2, "run_dir": str(run_dir),
            "resubmit_said": said, "times": times, "sacct": {job: cluster.sacct(job), job2: cluster.sacct(job2)},
            "urgent": urgent}


def checks(result: dict[str, Any], config: Path, start: Shape, then: Shape) -> dict[str, Any]:
    """What the run folder says: shapes, counters, LR per step, against what the recipe fixes."""
    run_dir = Path(result["run_dir"])
    shapes = read_rows(run_dir / "shapes.jsonl")
    rows = read_rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    virtual = start.world
    cfg = load_config(config)
    global_batch = virtual * BATCH
    spe = SAMPLES_PER_EPOCH // global_batch
    schedule = LRSchedule(cfg.optim, global_batch, spe, EPOCHS)
    steps = [r["step"] for r in train]
    lr_error = max(abs(r["lr"] - schedule.lr(r["step"] - 1)) for r in train)
    epochs_ok = all(r["epoch"] == (r["step"] - 1) // spe for r in train)
    expected_shapes = [(start.nodes, start.tasks, 1), (start.nodes, start.tasks, 1), (then.nodes, then.tasks,
                                                                                     virtual // then.world)]
    return {
        "shapes": [{k: s.get(k) for k in ("job", "attempt", "step", "epoch", "nodes", "tasks_per_node", "world_size",
                                          "virtual_ranks", "hosted", "global_batch")} for s in shapes],
        "shapes_as_expected": [(s["nodes"], s["tasks_per_node"], s["hosted"]) for s in shapes] == expected_shapes
        and all(s["virtual_ranks"] == virtual and s["global_batch"] == global_batch for s in shapes),
        "resume_steps": [r["step"] for r in rows if r.get("event") == "resume"],
        "steps_continuous": steps == list(range(1, EPOCHS * spe + 1)),
        "last_step": steps[-1] if steps else 0, "expected_last_step": EPOCHS * spe,
        "epochs_continuous": epochs_ok, "lr_max_abs_error": lr_error,
        "lr": [round(r["lr"], 6) for r in train],
        "global_batch": global_batch, "virtual_ranks": virtual, "steps_per_epoch": spe,
    }


# ------------------------------------------------------------------------------------------- measurements
def kinds(data: Path, cache: Path, run_dir: Path) -> Callable[[str], str]:
    code_roots = tuple(str(p) for p in {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                                         Path(sys.prefix), ROOT} if str(p) != "/")

    def kind(path: str) -> str:
        if path.startswith(str(run_dir / "checkpoints")):  # .ckpt-N.pt.tmpPID: a write read back before its rename
            return "checkpoint_read_back" if os.path.basename(path).startswith(".") else "checkpoints"
        if path.startswith(str(run_dir / "code")):
            return "code"
        if path.startswith(str(run_dir)):
            return "run_folder"
        if path.startswith(str(data)):
            return "data"
        if path.startswith(str(cache)):
            return "data_index"
        if path.startswith(code_roots) or path.startswith(("/usr/lib", "/usr/local/lib", "/lib")):
            return "code"
        return "system"
    return kind


def highest(samples: list[tuple[float, dict[str, int]]], until: float = float("inf")) -> dict[str, int]:
    """Each counter's highest value sampled up to `until` (all of them grow; an exiting process's last sample
    lacks its Vm lines)."""
    out: dict[str, int] = defaultdict(int)
    for t, values in samples:
        if t <= until:
            for k, v in values.items():
                out[k] = max(out[k], v)
    return out


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2 if v else 0.0


def measure(watcher: Watcher, trace: Trace | None, result: dict[str, Any], data: Path, cache: Path) -> list[dict]:
    """Per attempt (start, requeue, continued): per-rank numbers until the first step and for the whole attempt."""
    run_dir = Path(result["run_dir"])
    kind = kinds(data, cache, run_dir)
    attempts = [("start", result["job"], 1, 0), ("requeued", result["job"], 2, 1), ("continued", result["job2"], 1, 2)]
    tgid = trace.threads_of() if trace else {}
    threads: dict[int, list[int]] = defaultdict(list)
    for tid, pid in tgid.items():
        threads[pid].append(tid)
    out = []
    for name, job, attempt, resumes in attempts:
        procs = [p for p in watcher.procs.values() if p.job == job and p.attempt == attempt]
        if not procs:
            out.append({"attempt": name, "ranks": 0})
            continue
        began = min(p.first_seen for p in procs)
        first = watcher.first_step_logged(resumes, began) or max(p.samples[-1][0] for p in procs if p.samples)
        ranks = []
        for p in sorted(procs, key=lambda p: p.rank):
            end = p.samples[-1][0] if p.samples else first
            at_first, final = highest(p.samples, first), highest(p.samples)
            row: dict[str, Any] = {"rank": p.rank, "pid": p.pid, "node": p.node,
                                   "rchar_to_first_step": at_first.get("rchar", 0), "rchar": final.get("rchar", 0),
                                   "read_bytes_storage": final.get("read_bytes", 0),
                                   "peak_rss_mib_at_first_step": round(at_first.get("VmHWM", 0) / 1024, 1),
                                   "peak_rss_mib": round(final.get("VmHWM", 0) / 1024, 1)}
            if trace:
                use = trace.usage(threads.get(p.pid, [p.pid]), [("to_first_step", 0.0, first), ("attempt", 0.0, end + 5)], kind)
                for w, u in use.items():
                    row[w] = {"opens": u.opens, "failed_opens": u.failed_opens, "opened": dict(u.opened),
                              "read_bytes": dict(u.read_bytes), "connects": u.connects, "dns_queries": u.dns_queries,
                              "store_requests": u.store_requests, "store_answers": u.store_answers,
                              "store_round_trips": u.store_round_trips, "socket_received": u.socket_received,
                              "socket_sent": u.socket_sent}
            ranks.append(row)
        out.append({"attempt": name, "job": job, "slurm_attempt": attempt, "ranks": len(ranks),
                    "start_to_first_step_s": round(first - began, 1), "per_rank": ranks})
    return out


def summary(attempt: dict[str, Any]) -> dict[str, Any]:
    """Median, rank 0 and max over ranks of each number."""
    ranks = attempt.get("per_rank", [])
    if not ranks:
        return {}

    def stat(get: Callable[[dict], float]) -> dict[str, float]:
        values = [get(r) for r in ranks]
        r0 = next((get(r) for r in ranks if r["rank"] == 0), 0)
        return {"rank0": r0, "median": median(values), "max": max(values), "sum": sum(values)}

    def traced(window: str, key: str, sub: str | None = None) -> Callable[[dict], float]:
        def get(r: dict) -> float:
            value = r.get(window, {}).get(key, 0)
            return sum(value.values()) if sub == "*" else value.get(sub, 0) if sub else value
        return get

    s = {"ranks": attempt["ranks"], "start_to_first_step_s": attempt["start_to_first_step_s"],
         "peak_rss_mib": stat(lambda r: r["peak_rss_mib"]),
         "rchar_mib_to_first_step": stat(lambda r: r["rchar_to_first_step"] / 2**20)}
    if "to_first_step" in ranks[0]:
        w = "to_first_step"
        s.update({
            "opens": stat(traced(w, "opens")), "failed_opens": stat(traced(w, "failed_opens")),
            "file_mib_read": stat(lambda r: sum(r[w]["read_bytes"].values()) / 2**20),
            "code_mib_read": stat(lambda r: r[w]["read_bytes"].get("code", 0) / 2**20),
            "code_opens": stat(lambda r: r[w]["opened"].get("code", 0)),
            "data_opens": stat(lambda r: r[w]["opened"].get("data", 0)),
            "index_kib_read": stat(lambda r: r[w]["read_bytes"].get("data_index", 0) / 2**10),
            "checkpoint_mib_read": stat(lambda r: r[w]["read_bytes"].get("checkpoints", 0) / 2**20),
            "read_back_mib": stat(lambda r: r[w]["read_bytes"].get("checkpoint_read_back", 0) / 2**20),
            "connects": stat(traced(w, "connects")), "dns_queries": stat(traced(w, "dns_queries")),
            "store_requests": stat(traced(w, "store_requests")),
            "store_round_trips": stat(traced(w, "store_round_trips")),
            "socket_mib_received": stat(lambda r: r[w]["socket_received"] / 2**20),
        })
    return s


def machine(env: dict[str, str]) -> dict[str, Any]:
    lscpu = sh("lscpu")
    model = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env).stdout.strip().splitlines()[-1]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {"cpu": model[0] if model else platform.machine(), "cores": os.cpu_count(), "ram_mib": mem,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch": version([sys.executable, "-c", "import torch; print(torch.__version__)"]),
            "dali": version([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"]),
            "slurm": version(["sinfo", "--version"]), "strace": sh("strace", "-V").splitlines()[0],
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version()}


def reference_run(work: Path, config: Path, start: Shape) -> Path:
    """`senet train --nproc 8` of the recipe with the same virtual ranks, uninterrupted (no Slurm)."""
    out = work / f"reference-{start}"
    procs = min(8, start.world)
    done = subprocess.run([sys.executable, "-m", "senet", "train", str(config), "--nproc", str(procs), "--out", str(out),
                           "--set", f"train.virtual_ranks={start.world}"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=1200)
    if done.returncode:
        raise RuntimeError(f"reference run failed: {done.stderr[-1500:]}")
    return out


def same_weights(a: Path, b: Path) -> dict[str, Any]:
    import torch
    ours = torch.load(a / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    theirs = torch.load(b / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    m1, m2 = ours["model"], theirs["model"]
    differ = [k for k in m1 if not torch.equal(m1[k], m2[k])]
    worst = max((float((m1[k].double() - m2[k].double()).abs().max()) for k in differ if m1[k].is_floating_point()),
                default=0.0)
    return {"steps": [ours["step"], theirs["step"]], "tensors": len(m1), "tensors_differing": len(differ),
            "max_abs_difference": worst}


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# The paper's shape rehearsed: virtual ranks on the local Slurm cluster",
        "",
        "`python benchmarks/bench_elastic.py` (script docstring: what runs and how each number is measured).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_mib'] // 1024} GiB RAM, shared with other work "
        f"(load average at the end {m['load_average']}); torch {m['torch']}, DALI {m['dali']}, {m['slurm']}, "
        f"{m['strace']}, Python {m['python']}; {m['date']}. Every node of the cluster is this host, every rank a CPU "
        f"process: `slurm.gpus_per_node=8` gives 8 tasks per node, the fake GPUs are unused.",
        f"Recipe: se_resnext_tiny, 32 px crops, {BATCH} images per virtual rank, {SAMPLES_PER_EPOCH} samples per epoch, "
        f"{EPOCHS} epochs, `data.py_workers=0`, `data.threads=1`, `train.torch_threads=1`, checkpoints every 2 steps; "
        f"traced by strace: {report['traced']}.",
        "",
    ]
    for r in report["rehearsals"]:
        c = r["checks"]
        lines += [f"## {r['start']} -> {r['then']}: {c['virtual_ranks']} virtual ranks, global batch {c['global_batch']}", ""]
        lines += ["| start | job, attempt | step | nodes x tasks | processes | virtual ranks | hosted per process | global batch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, s in enumerate(c["shapes"]):
            lines.append(f"| {i + 1} | {s['job']}, {s['attempt']} | {s['step']} | {s['nodes']} x {s['tasks_per_node']} | "
                         f"{s['world_size']} | {s['virtual_ranks']} | {s['hosted']} | {s['global_batch']} |")
        lines += ["", f"- shapes.jsonl as expected ({r['start']}, {r['start']} after the requeue, {r['then']}, same virtual "
                      f"ranks and global batch): **{c['shapes_as_expected']}**; Slurm states {r['sacct']}",
                  f"- resumed at steps {c['resume_steps']}; logged steps 1..{c['last_step']} without gap or repeat "
                  f"(expected 1..{c['expected_last_step']}): **{c['steps_continuous']}**; epochs continuous: "
                  f"**{c['epochs_continuous']}**; LR against the schedule of global batch {c['global_batch']}: max |error| "
                  f"{c['lr_max_abs_error']:.2e}",
                  "- `senet submit --resume` said: " + " / ".join(line.strip() for line in r["resubmit_said"].splitlines())]
        if r.get("reference"):
            ref = r["reference"]
            lines.append(f"- final weights against an uninterrupted `senet train --nproc 8` with the same virtual ranks "
                         f"(steps {ref['steps']}): {ref['tensors_differing']} of {ref['tensors']} tensors differ "
                         f"(max |difference| {ref['max_abs_difference']:.3g})")
        t = r["times"]
        lines.append(f"- wall times on this host only (traced: {report['traced']}): running -> 3 steps "
                     f"{t['trained'] - t['running']:.0f} s, preemption -> running again {t['running_again'] - t['preempted']:.0f} s, "
                     f"-> trained after its resume {t['trained_again'] - t['running_again']:.0f} s; continued job to the end "
                     f"{t['finished'] - t['resubmitted']:.0f} s; peak memory of all ranks together "
                     f"{r['peak_total_rss_mib']:.0f} MiB")
        lines.append("")
    lines += ["## Per rank, from a process's start until rank 0 logs its first step", "",
              "Each cell: rank 0 / median / max over the ranks (sum over ranks in brackets where it is what a shared "
              "service sees). Opens and bytes are what the processes asked of the file system (on this host nearly all "
              "from the page cache: at most "
              f"{report['max_storage_read_bytes'] / 2**20:.0f} MiB per rank came from the disk, `read_bytes` of "
              "/proc/<pid>/io); on a cluster whose code, data and run folder are on a shared file system, that is "
              "what it serves. Store requests: sends on the TCPStore client socket; a round trip: a send followed "
              "by a read of the answer.", ""]
    head = ["shape, attempt", "ranks", "start -> first step (this host)", "peak RSS MiB", "file opens",
            "failed opens (import search)", "code MiB read", "data-index KiB read", "checkpoint MiB read", "read-back of checkpoints written, MiB",
            "TCP connects", "store requests", "store round trips", "socket MiB received"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(s: dict, key: str, fmt: str = "{:.0f}", total: bool = False) -> str:
        if key not in s:
            return "-"
        v = s[key]
        text = " / ".join(fmt.format(v[k]) for k in ("rank0", "median", "max"))
        return text + (f" ({fmt.format(v['sum'])})" if total else "")
    for r in report["rehearsals"]:
        for a in r["attempts"]:
            s = a.get("summary") or {}
            if not s:
                continue
            shape = r["start"] if a["attempt"] != "continued" else r["then"]
            lines.append("| " + " | ".join([
                f"{shape}, {a['attempt']}", str(s["ranks"]), f"{s['start_to_first_step_s']:.0f} s",
                cell(s, "peak_rss_mib"), cell(s, "opens", total=True), cell(s, "failed_opens", total=True),
                cell(s, "code_mib_read", "{:.1f}", True), cell(s, "index_kib_read", "{:.0f}", True),
                cell(s, "checkpoint_mib_read", "{:.2f}", True), cell(s, "read_back_mib", "{:.2f}", True),
                cell(s, "connects", total=True),
                cell(s, "store_requests", total=True), cell(s, "store_round_trips", total=True),
                cell(s, "socket_mib_received", "{:.2f}", True)]) + " |")
    lines += ["", *scaling(report)]
    return "\n".join(lines)


def scaling(report: dict[str, Any]) -> list[str]:
    """The numbers that grow with the rank count, side by side for each start and requeue."""
    rows = []
    for r in report["rehearsals"]:
        for a in r["attempts"]:
            s = a.get("summary") or {}
            if s and a["attempt"] != "continued" and "connects" in s:
                rows.append((s["ranks"], f"{r['start']}, {a['attempt']}", s))
    if not rows:
        return []
    rows.sort(key=lambda x: (x[0], not x[1].endswith("start")))
    lines = ["## What grows with the rank count (starts and requeues above, same recipe per rank)", "",
             "| ranks | shape, attempt | TCP connects per rank (median / max) | store requests per rank (median; rank 0) "
             "| store round trips, all ranks | DNS queries, all ranks | file opens, all ranks | code MiB read, all ranks "
             "| checkpoint MiB read from files, all ranks | socket MiB received per rank (median) | peak RSS per rank "
             "(median), x 8 per node |", "|" + " --- |" * 11]
    for n, name, s in rows:
        lines.append(f"| {n} | {name} | {s['connects']['median']:.0f} / {s['connects']['max']:.0f} | "
                     f"{s['store_requests']['median']:.0f}; {s['store_requests']['rank0']:.0f} | "
                     f"{s['store_round_trips']['sum']:.0f} | {s['dns_queries']['sum']:.0f} | {s['opens']['sum']:.0f} | "
                     f"{s['code_mib_read']['sum']:.0f} | {s['checkpoint_mib_read']['sum']:.2f} | "
                     f"{s['socket_mib_received']['median']:.2f} | {s['peak_rss_mib']['median']:.0f} MiB, "
                     f"{8 * s['peak_rss_mib']['median'] / 1024:.1f} GiB |")
    lines += ["", *findings(rows), ""]
    return lines


def findings(rows: list[tuple[int, str, dict[str, Any]]]) -> list[str]:
    """What the smallest and the largest start say, in sentences built from the measured numbers."""
    def others(s: dict[str, Any]) -> float:
        return s["store_round_trips"]["sum"] - s["store_round_trips"]["rank0"]

    starts = [(n, s) for n, name, s in rows if name.endswith("start")]
    requeues = [(n, s) for n, name, s in rows if name.endswith("requeued")]
    if len(starts) < 2:
        return []
    (n1, a), (n2, b) = starts[0], starts[-1]
    k = n2 / n1
    out = [f"From {n1} to {n2} ranks ({k:.0f}x), at each start:", "",
           f"- flat per rank: file opens ({a['opens']['median']:.0f} -> {b['opens']['median']:.0f}, of them "
           f"{a['failed_opens']['median']:.0f} -> {b['failed_opens']['median']:.0f} failed: Python's import search), code "
           f"read ({a['code_mib_read']['median']:.1f} -> {b['code_mib_read']['median']:.1f} MiB: interpreter, torch, DALI, "
           f"the run's code snapshot), data-index read ({a['index_kib_read']['median']:.0f} -> "
           f"{b['index_kib_read']['median']:.0f} KiB), peak RSS ({a['peak_rss_mib']['median']:.0f} -> "
           f"{b['peak_rss_mib']['median']:.0f} MiB), socket bytes received ({a['socket_mib_received']['median']:.1f} -> "
           f"{b['socket_mib_received']['median']:.1f} MiB). So the job's totals grow with the ranks: "
           f"{a['opens']['sum']:.0f} -> {b['opens']['sum']:.0f} opens and {a['code_mib_read']['sum']:.0f} -> "
           f"{b['code_mib_read']['sum']:.0f} MiB of code asked of the file system at once; from a venv on a shared "
           f"file system, that is the import storm a real cluster feels at every start and every requeue (a venv "
           f"or container image on node-local disk takes it off the shared one).",
           f"- grows per rank: TCP connections ({a['connects']['median']:.0f} -> {b['connects']['median']:.0f} per rank, "
           f"median; {a['connects']['sum']:.0f} -> {b['connects']['sum']:.0f} in all: gloo connects every pair of ranks, "
           f"{n1 * (n1 - 1) // 2} -> {n2 * (n2 - 1) // 2} pairs), and TCPStore round trips ({a['store_round_trips']['median']:.0f} -> "
           f"{b['store_round_trips']['median']:.0f} per rank, about {a['store_round_trips']['median'] / (n1 - 1):.1f} / "
           f"{b['store_round_trips']['median'] / (n2 - 1):.1f} per other rank: gloo's pairs meet through the store; "
           f"{others(a):.0f} -> {others(b):.0f} for all ranks but 0, {others(b) / max(1, others(a)):.1f}x for {k:.0f}x the "
           f"ranks: quadratic, all served by the one store that rank 0 hosts).",
           f"- on rank 0 alone: its own store round trips ({a['store_round_trips']['rank0']:.0f} -> "
           f"{b['store_round_trips']['rank0']:.0f}: it polls while it waits for the others, so they follow how long the "
           f"slowest rank takes to arrive more than the rank count) and its DNS queries "
           f"({a['dns_queries']['rank0']:.0f} -> {b['dns_queries']['rank0']:.0f}, about one per rank; the others a few each: median "
           f"{a['dns_queries']['median']:.0f} / {b['dns_queries']['median']:.0f}; the library itself resolves no names, so they come from inside torch); on a real cluster one slow resolver answer per rank delays everyone's start."]
    if requeues:
        (m1, c), (m2, d) = requeues[0], requeues[-1]
        out.append(f"- the checkpoint at a resume: read from files by rank 0 only ({c['checkpoint_mib_read']['rank0']:.2f} MiB "
                   f"at {m1} ranks, {d['checkpoint_mib_read']['rank0']:.2f} MiB at {m2}: the file once; every other rank "
                   f"0 bytes) and "
                   f"broadcast to the others over gloo (socket bytes received per rank at the resume "
                   f"{c['socket_mib_received']['median']:.1f} / {d['socket_mib_received']['median']:.1f} MiB against "
                   f"{a['socket_mib_received']['median']:.1f} / {b['socket_mib_received']['median']:.1f} MiB at the first "
                   f"start): the shared file system's share does not grow with the ranks.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4x8:2x8", "2x8:1x8", "1x8:1x4"],
                   help="START:THEN pairs (nodes x tasks per node), e.g. 4x8:2x8 (default: 4x8:2x8 2x8:1x8 1x8:1x4)")
    p.add_argument("--no-trace", action="store_true", help="no strace: the /proc watcher alone")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the uninterrupted `senet train --nproc 8` of each recipe whose final weights are compared")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "RESULTS_elastic.json")
    p.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "RESULTS_elastic.md")
    p.add_argument("--from-json", type=Path, metavar="JSON", help="only rewrite --md from an earlier run's JSON")
    args = p.parse_args()
    if args.from_json:
        args.md.write_text(markdown(json.loads(args.from_json.read_text())))
        return
    if os.geteuid() != 0:
        sys.exit("bench_elastic: run as root (the local Slurm cluster starts daemons)")
    if not args.no_trace and shutil.which("strace") is None:
        sys.exit("bench_elastic: strace not found (apt-get install strace), or give --no-trace")
    pairs = [tuple(Shape.parse(x) for x in pair.split(":")) for pair in args.shapes]
    for start, then in pairs:
        if start.world % then.world:
            sys.exit(f"bench_elastic: {then} ({then.world} processes) cannot host the {start.world} virtual ranks of {start}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_elastic-"))
    data, cache = work / "data", work / "cache"
    make_synthetic(data, SyntheticSpec(classes=6, train_per_class=24, val_per_class=2, test=0, seed=1,
                                       min_side=40, max_side=64))
    report: dict[str, Any] = {"traced": not args.no_trace, "rehearsals": []}
    watcher = Watcher()
    watcher.start()
    with open(LOCK, "w") as lock:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster = None
        trace = None
        try:
            cluster = Cluster()
            report["machine"] = machine(cluster.env)
            for start, then in pairs:
                config = work / f"elastic-{start}.yaml"
                config.write_text(CONFIG.format(data=data, cache=cache, samples=SAMPLES_PER_EPOCH, epochs=EPOCHS,
                                                batch=BATCH))
                trace = None if args.no_trace else Trace(work / f"strace-{start}", cluster.slurmd_pids())
                watcher.peak_total_rss_mib = 0.0
                try:
                    result = rehearse(cluster, watcher, work, config, start, then, trace)
                finally:
                    if trace:
                        trace.detach()
                result["peak_total_rss_mib"] = watcher.peak_total_rss_mib
                result["checks"] = checks(result, config, start, then)
                result["attempts"] = measure(watcher, trace, result, data, cache)
                for a in result["attempts"]:
                    a["summary"] = summary(a)
                print(json.dumps({"shape": f"{start}->{then}", "checks": {k: v for k, v in result["checks"].items()
                                                                           if k != "lr"}}, default=str), flush=True)
                for a in result["attempts"]:
                    print(a["attempt"], json.dumps(a["summary"]), flush=True)
                report["rehearsals"].append(result)
        finally:
            watcher.stop.set()
            if trace:
                trace.detach()
            Cluster.down()
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not args.no_reference:
        for result, (start, _) in zip(report["rehearsals"], pairs):
            result["reference"] = same_weights(Path(result["run_dir"]), reference_run(work, work / f"elastic-{start}.yaml",
                                                                                       start))
    report["min_available_mib"] = watcher.min_available
    report["max_storage_read_bytes"] = max((a2["read_bytes_storage"] for r in report["rehearsals"] for a in r["attempts"]
                                            for a2 in a.get("per_rank", [])), default=0)
    report["work"] = str(work)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    args.md.write_text(markdown(report))
    print(f"wrote {args.json} and {args.md}", flush=True)


if __name__ == "__main__":
    main()
