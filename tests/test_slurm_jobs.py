"""`senet submit` against the real local Slurm cluster (slurm/cluster/up.sh explains its settings): not mocked.

A 2-node x 2-task CPU (gloo) job on make-synthetic data completes and reports through its run folder;
a job interrupted the way a time limit interrupts it (USR2 via submitit's `_interrupt(timeout=True)`)
and a job preempted by the `urgent` partition are requeued, resume from the checkpoint written at the
signal, and end with parameters bit-identical to `senet train --nproc 4` (same world size); so does a
cancelled run continued with `senet submit --resume --nodes 1` on half its processes (each hosting two of
its four virtual ranks) after its newest checkpoint was damaged, while 3 nodes are refused. A rank
stopped with SIGSTOP, then a node lost (its slurmd, step and ranks killed), then a rank stopped again
are named, and the run continues each time in a new job without that node - the last time on the one
healthy node left, its 2 processes hosting the run's 4 virtual ranks - to the same parameters; a job preempted on the
`cancel` partition submits the run's next job itself, and names its injected slow rank; a NaN loss
stops the run once, with one line. The sbatch script of the paper recipe and sbatch's refusals are
checked without running anything.

One uninterrupted reference run serves every comparison; it starts with the module and runs while the
first jobs queue.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# A GPU node's bare interpreter has no submitit: this module is skipped there, so `pytest -m gpu` collects.
submitit = pytest.importorskip("submitit", reason="the Slurm tests need submitit (pip install submitit)")

from pipeline.synthetic import SyntheticSpec, make_synthetic
from slurm.recovery import usable_nodes
from slurm.sbatch import check_job_config, parse_time, sbatch_parameters
from senet.cli import main
from training.config import ConfigError, load_config
from training.metrics import read_metrics
from tests.helpers import ROOT as REPO, flip_a_bit, sacct_states, slurm, start_cluster, wait_until
from training.checkpoint_manifest import read_manifest


ROOT = Path(__file__).resolve().parents[1]
WORLD = 4  # 2 nodes x 2 tasks
EPOCHS, STEPS_PER_EPOCH = 6, 6  # 96 training images / (4 ranks x batch 4)
CONFIG = f"""\
model: {{arch: se_resnext_tiny, num_classes: 6, channels_last: false}}
data: {{dtype: float32, crop_size: 32, py_workers: 1, threads: 1}}
optim: {{lr: 0.4, reference_batch: 64}}
train: {{device: cpu, epochs: {EPOCHS}, batch_size: 4, seed: 3, precision: fp32, log_every: 2, checkpoint_every: 1000}}
slurm: {{nodes: 2, gpus_per_node: 2, cpus_per_task: 1, time_min: 10, signal_delay_s: 30, exclusive: false}}
"""
JOB_TIMEOUT_S = 180  # a requeue cycle takes ~22 s here, a job start ~10 s on the loaded 2-core machine


# ------------------------------------------------------------------------------------------ helpers
def in_queue(job_id: str) -> bool:
    return bool(slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip())


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((r.get("step", 0) for r in read_metrics(path) if "loss" in r), default=0)


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_parameters(run_dir: Path, reference: Path) -> None:
    ours, theirs = model_state(run_dir), model_state(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} of {len(ours)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Start the cluster (idempotent), export its environment for this module, cancel our jobs at the end."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in start_cluster().items():
            mp.setenv(name, value)
        yield dict(os.environ)
        names = slurm("squeue", "-h", "-o", "%i %j").splitlines()
        leftovers = [line.split()[0] for line in names if line.split()[1].startswith("senet-test_slurm_jobs")]
        if leftovers:
            subprocess.run(["scancel", *leftovers], check=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, config and output root (all nodes are this host, so /tmp is 'shared storage')."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    make_synthetic(root / "data", SyntheticSpec(classes=6, train_per_class=16, val_per_class=4, test=0, seed=1,
                                                min_side=40, max_side=64))
    paths = f"root: {root / 'data'}, cache_dir: {root / 'cache'}, "
    (root / "test_slurm_jobs.yaml").write_text(CONFIG.replace("data: {", "data: {" + paths))
    return root


@pytest.fixture(scope="module")
def reference_proc(workspace: Path) -> Iterator[subprocess.Popen]:
    """`senet train --nproc 4` of the same config, started at once (it runs while jobs queue)."""
    cpus = sorted(os.sched_getaffinity(0))[:WORLD]  # at most one core per rank, like cpus_per_task=1 in the job
    with open(workspace / "reference.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "senet", "train", str(workspace / "test_slurm_jobs.yaml"),
                                 "--nproc", str(WORLD), "--out", str(workspace / "reference")],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    yield proc
    if proc.poll() is None:  # the module ended early
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(reference_proc: subprocess.Popen, workspace: Path) -> Path:
    code = reference_proc.wait(timeout=300)
    assert code == 0, (workspace / "reference.log").read_text()[-3000:]
    return workspace / "reference"


@pytest.fixture(autouse=True)
def _start_reference_early(reference_proc: subprocess.Popen) -> None:
    """Every test starts the reference run if it is not running yet."""


def submit(workspace: Path, *extra: str) -> tuple[str, Path]:
    """`senet submit` in this process; returns the job id and its run folder."""
    answer = workspace / f"submit-{time.monotonic_ns()}.json"
    code = main(["submit", str(workspace / "test_slurm_jobs.yaml"), "--out", str(workspace / "runs"),
                 "--json", str(answer), *extra])
    assert code == 0
    info = json.loads(answer.read_text())
    return info["job_id"], Path(info["run_dir"])


def wait_for_end(job_id: str, run_dir: Path) -> None:
    wait_until(lambda: not in_queue(job_id), JOB_TIMEOUT_S, f"job {job_id} leaving the queue")
    wait_until(lambda: sacct_states(job_id)[-1:] == ["COMPLETED"], 15,
               f"sacct reporting job {job_id} COMPLETED (it says {sacct_states(job_id)}; logs in {run_dir / 'logs'})")


def preempt(job_id: str) -> str:
    """An urgent job on exactly the nodes of `job_id` (the cluster's idle nodes would not preempt it); its id."""
    nodes = slurm("squeue", "-h", "-j", job_id, "-o", "%N").strip()
    return slurm("sbatch", "--parsable", "--partition=urgent", "--nodes=2", f"--nodelist={nodes}", "--exclusive",
                 "--output=/dev/null", "--job-name=urgent-test_slurm_jobs", "--wrap", "true").strip()


def rank0_log(job_id: str, run_dir: Path) -> str:
    return (run_dir / "logs" / f"{job_id}_0_log.err").read_text()


def assert_resumed_from_signal_checkpoint(job_id: str, run_dir: Path) -> int:
    """The first attempt wrote a checkpoint at the signal; the second resumed from exactly that step."""
    log = rank0_log(job_id, run_dir)
    saved = [int(line.split("checkpoint at step ")[1].split()[0]) for line in log.splitlines()
             if "written after the time-limit/preemption signal" in line]
    resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert len(saved) == 1 and resumes == saved, (saved, resumes, log[-3000:])
    assert 0 < saved[0] < EPOCHS * STEPS_PER_EPOCH
    assert "attempt 2" in log
    return saved[0]


# -------------------------------------------------------------------------------------------- tests
def test_dry_run_of_the_paper_recipe_shows_4_nodes_of_8_gpus_and_8_tasks(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["submit", str(ROOT / "configs" / "se_resnext50_32x4d.yaml"), "--out", str(tmp_path), "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=1440", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue"):  # a cluster with JobRequeue=0 would refuse the requeue otherwise
        assert line in script.splitlines(), script
    assert "submitit.core._submit" in script and "PYTHONPATH=" in script
    # srun of Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch: the job passes it itself
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--cpus-per-task 10" in srun, srun
    assert list(tmp_path.iterdir()) == []  # nothing submitted, no run folder


@pytest.mark.parametrize("text, minutes", [("90", 90), ("45:30", 46), ("1:30:00", 90), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("0-00:01", 1)])
def test_time_limits_in_slurm_formats(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


def test_cpu_job_has_one_task_per_node_and_no_gpus(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["slurm.gpus_per_node=0", "slurm.partition=debug"])
    params = sbatch_parameters(cfg, tmp_path / "run")
    assert params["ntasks_per_node"] == 1 and "gpus_per_node" not in params and params["partition"] == "debug"
    with pytest.raises(ConfigError, match="slurm.gpus_per_node = 0"):
        check_job_config(load_config(ROOT / "configs" / "demo.yaml", ["slurm.gpus_per_node=0", "train.device=gpu"]))
    with pytest.raises(ConfigError, match="signal_delay_s"):
        check_job_config(load_config(ROOT / "configs" / "demo.yaml", ["slurm.time_min=1", "slurm.signal_delay_s=60"]))


def test_unknown_partition_is_one_clear_line(cluster: dict[str, str], workspace: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    code = main(["submit", str(workspace / "test_slurm_jobs.yaml"), "--out", str(workspace / "refused"),
                 "--partition", "nosuch"])
    assert code == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    assert lines[0].startswith("senet submit: error: sbatch refused the job: Invalid partition") and "debug" in lines[0]
    assert not any((workspace / "refused").iterdir())  # no half run folder left behind


def test_two_nodes_two_tasks_complete_and_report_through_the_run_folder(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    job_id, run_dir = submit(workspace)
    wait_for_end(job_id, run_dir)
    reference = request.getfixturevalue("reference")  # only now: it ran alongside the job

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "val_top1" in r] == list(range(EPOCHS))
    assert max(r["step"] for r in rows) == EPOCHS * STEPS_PER_EPOCH
    assert all(r["val_images"] == 24 for r in rows if "val_top1" in r)  # every val image once over 4 ranks
    for name in ("config.given.yaml", "config.yaml", "job.json", "curves.png", "checkpoints/last.pt",
                 "code/training/engine.py", "code/slurm/job.py"):
        assert (run_dir / name).is_file(), name
    for rank in range(WORLD):
        assert (run_dir / "logs" / f"{job_id}_{rank}_log.err").is_file()
    assert f"code from {run_dir / 'code'}" in rank0_log(job_id, run_dir)  # the snapshot, not the checkout
    assert_same_parameters(run_dir, reference)

    capsys.readouterr()
    assert main(["jobs"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [job_id, "COMPLETED"] in [row[:2] for row in listed]
    assert main(["logs", job_id, "--rank", "3", "--stream", "out"]) == 0
    assert "global_rank=3(4)" in capsys.readouterr().out


def test_timeout_requeues_and_resumes_to_the_same_parameters(cluster: dict[str, str], workspace: Path,
                                                             request: pytest.FixtureRequest) -> None:
    job_id, run_dir = submit(workspace)
    job = submitit.SlurmJob(folder=run_dir / "logs", job_id=job_id, tasks=list(range(WORLD)))
    wait_until(lambda: steps_logged(run_dir) >= 2, JOB_TIMEOUT_S, f"job {job_id} training")
    job._interrupt(timeout=True)  # USR2, as `--signal=USR2@signal_delay_s` before the time limit
    wait_for_end(job_id, run_dir)
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    assert_resumed_from_signal_checkpoint(job_id, run_dir)
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))


def test_preemption_by_the_urgent_partition_requeues_and_resumes_to_the_same_parameters(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest) -> None:
    job_id, run_dir = submit(workspace, "--partition", "debug")
    wait_until(lambda: steps_logged(run_dir) >= 2, JOB_TIMEOUT_S, f"job {job_id} training")
    urgent = preempt(job_id)
    wait_for_end(job_id, run_dir)
    assert sacct_states(urgent) == ["COMPLETED"]
    states = sacct_states(job_id)
    assert states[-1] == "COMPLETED" and states[0] in ("PREEMPTED", "REQUEUED"), states
    assert_resumed_from_signal_checkpoint(job_id, run_dir)
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))


@pytest.mark.parametrize("override, message", [
    ("model.arch=se_resnext51", "model.arch = 'se_resnext51' is not a registered model"),
    ("model.num_classes=7", "model.num_classes = 7 but"),
    ("data.root=/nowhere/imagenet", "data.root = '/nowhere/imagenet': folder not found; set data.root"),
])
def test_submit_refuses_what_training_would_reject_before_anything_is_queued(
        cluster: dict[str, str], workspace: Path, capsys: pytest.CaptureFixture, override: str, message: str) -> None:
    out = workspace / f"refused-{override.split('=')[0]}"
    code = main(["submit", str(workspace / "test_slurm_jobs.yaml"), "--out", str(out), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())  # no run folder, nothing for sbatch
    if override.startswith("data.root"):
        assert "--no-preflight" in err[0]


def test_a_cancelled_run_continues_on_half_its_nodes_with_submit_resume_to_the_same_parameters(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    job_id, run_dir = submit(workspace)
    assert main(["submit", "--resume", str(run_dir)]) == 2  # still queued or running: it resumes by itself
    assert "is still" in capsys.readouterr().err
    # Past the first epoch's checkpoint, so that a last.pt exists even if the SIGTERM checkpoint came too late
    wait_until(lambda: steps_logged(run_dir) >= STEPS_PER_EPOCH + 2, JOB_TIMEOUT_S, f"job {job_id} training")
    slurm("scancel", job_id)  # SIGTERM: every rank checkpoints at the next agreement and leaves
    wait_until(lambda: not in_queue(job_id), JOB_TIMEOUT_S, f"job {job_id} leaving the queue")
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 0 < stopped_at < EPOCHS * STEPS_PER_EPOCH
    # The newest checkpoint is damaged on the shared disk: the run continues from the one before it.
    manifest, _ = read_manifest(run_dir / "checkpoints")
    newest, previous = manifest.checkpoints[:2]
    assert newest.step == stopped_at
    flip_a_bit(run_dir / "checkpoints" / newest.file)

    capsys.readouterr()
    assert main(["submit", "--resume", str(run_dir), "--nodes", "3"]) == 2  # 6 processes cannot host 4 virtual ranks
    (refused,) = capsys.readouterr().err.strip().splitlines()
    assert "3 node(s) x 2 tasks = 6 processes cannot host the run's 4 virtual ranks" in refused
    assert "with 2 tasks per node use --nodes 1 or 2" in refused
    assert usable_nodes(None, ["node4"]) == 3  # what a failure's next job counts before it shrinks (none here)

    answer = workspace / "resume.json"
    assert main(["submit", "--resume", str(run_dir), "--nodes", "1", "--json", str(answer)]) == 0
    said = capsys.readouterr().out
    assert f"{newest.file} (sha256 differs" in said and f"continuing from step {previous.step}" in said, said
    assert "on 1 node(s) x 2 tasks, 2 of its 4 virtual ranks per process" in said, said
    resumed = json.loads(answer.read_text())
    assert resumed["run_dir"] == str(run_dir) and resumed["resumed_from_step"] == previous.step
    wait_for_end(resumed["job_id"], run_dir)
    info = json.loads((run_dir / "job.json").read_text())
    assert info["jobs"] == [job_id, resumed["job_id"]] and (info["nodes"], info["tasks_per_node"]) == (1, 2)
    resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes == [previous.step]
    shapes = [json.loads(line) for line in (run_dir / "shapes.jsonl").read_text().splitlines()]
    assert [(r["job"], r["step"], r["nodes"], r["tasks_per_node"], r["world_size"], r["virtual_ranks"], r["hosted"])
            for r in shapes] == [(job_id, 0, 2, 2, 4, 4, 1), (resumed["job_id"], previous.step, 1, 2, 2, 4, 2)]
    assert "nodes: 1" in (run_dir / "config.yaml").read_text()
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))


def test_a_run_whose_checkpoints_outlast_its_warning_is_refused_before_it_queues_again(
        cluster: dict[str, str], workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Its own metrics say a checkpoint takes 45 s: 30 s before the time limit cannot save it and requeue."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(workspace / "test_slurm_jobs.yaml")
    (run_dir / "config.yaml").write_text((workspace / "test_slurm_jobs.yaml").read_text())
    (run_dir / "job.json").write_text(json.dumps({"job_id": "999999", "workdir": str(workspace)}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "checkpoint", "step": 6, "write_s": 45.0}) + "\n")
    assert cfg.slurm.signal_delay_s == 30
    assert main(["submit", "--resume", str(run_dir)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "slurm.signal_delay_s = 30 s cannot cover a checkpoint" in line and "writes so far up to 45.00 s" in line
    assert not captured.out  # nothing submitted


def test_resume_of_a_folder_without_a_checkpoint_is_one_line(cluster: dict[str, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "999999", "workdir": str(tmp_path)}))
    assert main(["submit", "--resume", str(tmp_path), "--no-preflight"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable checkpoint" in err[0]
    assert main(["submit", "--resume", str(tmp_path / "nothing")]) == 2
    assert "job.json" in capsys.readouterr().err


def test_a_job_from_a_pack_staged_on_both_nodes_ends_like_the_tree_run(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest) -> None:
    """The two local 'nodes' share one disk: their ranks stage into one folder, under per-shard locks."""
    from pipeline.pack_reader import read_manifest
    from pipeline.pack_writer import PackSpec, pack

    packed = workspace / "pack"
    pack(workspace / "data", packed, ("train", "val"), PackSpec(shard_bytes=64 << 10, workers=2))
    stage_dir = workspace / "stage"
    job_id, run_dir = submit(workspace, "--set", f"data.root={packed}", "--set", f"data.stage_dir={stage_dir}")
    wait_for_end(job_id, run_dir)
    assert "staged" in rank0_log(job_id, run_dir)
    shards = read_manifest(packed)["splits"]["train"]["shards"]
    staged = next(stage_dir.glob("senet-*")) / "train"
    assert len(list(staged.glob("shard-*.tar"))) == len(shards) and not list(staged.glob("*.tmp*"))
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))


# --------------------------------------------------------------------------- faults: continued elsewhere
FAULT_TIMEOUT = "train.dist_timeout_s=10"  # a stopped rank is named after 10 s of silence


def heartbeat(run_dir: Path, job_id: str, rank: int) -> dict:
    """The rank's heartbeat in job `job_id` (training.health), once it has one."""
    found: list[dict] = []

    def beating() -> bool:
        found[:] = [b for p in run_dir.glob(f"health/*/rank-{rank}.json") if (b := beat_of_job(p, job_id))]
        return bool(found)

    wait_until(beating, JOB_TIMEOUT_S, f"job {job_id}'s rank {rank} beating")
    return found[0]


def beat_of_job(path: Path, job_id: str) -> dict | None:
    """The heartbeat in `path` if a task of `job_id` wrote it (its process's environment says which job)."""
    try:
        beat = json.loads(path.read_text())
        environ = Path(f"/proc/{beat['pid']}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return beat if f"SLURM_JOB_ID={job_id}".encode() in environ else None


def next_job(run_dir: Path, after: str) -> str:
    """The job that continues the run after job `after` (job.json names it)."""
    def current() -> str:
        return str(json.loads((run_dir / "job.json").read_text())["job_id"])
    wait_until(lambda: current() != after, JOB_TIMEOUT_S, f"a job continuing the run of job {after}")
    return current()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nodes_of(job_id: str) -> set[str]:
    shown = slurm("scontrol", "show", "hostnames", slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList")
                  .split()[-1])
    return set(shown.split())


def senet_jobs(capsys: pytest.CaptureFixture) -> dict[str, str]:
    """`senet jobs`: job id -> its whole line."""
    capsys.readouterr()
    assert main(["jobs"]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}


def test_a_stopped_rank_then_a_lost_node_then_another_stopped_rank_are_named_and_the_run_continues_elsewhere_and_at_last_on_the_one_node_left_to_the_same_parameters(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    first, run_dir = submit(workspace, "--set", FAULT_TIMEOUT)
    wait_until(lambda: steps_logged(run_dir) >= STEPS_PER_EPOCH + 2, JOB_TIMEOUT_S, f"job {first} past a checkpoint")
    hung = heartbeat(run_dir, first, 3)  # on the job's second node
    os.kill(hung["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    second = next_job(run_dir, first)
    continued_after = time.monotonic() - stopped
    (named,) = records(run_dir)
    assert named["kind"] == "silent" and named["ranks"] == [3] and named["nodes"] == [hung["node"]], named
    assert f"rank 3 (node {hung['node']}" in named["message"] and "stopped answering" in named["message"]
    assert named["action"] == "continued" and named["new_job"] == second and named["exclude"] == [hung["node"]]
    assert continued_after < 10 + 10, continued_after  # train.dist_timeout_s, then seconds
    wait_until(lambda: not in_queue(first), 30, f"job {first} ending (cancelled by the rank that named rank 3)")
    wait_until(lambda: sacct_states(first) == ["CANCELLED"], 15, f"sacct reporting job {first} CANCELLED")

    killed: list[int] = []
    try:
        wait_until(lambda: heartbeat(run_dir, second, 2)["step"] >= named["resume_step"] + 2, JOB_TIMEOUT_S,
                   f"job {second} training")
        lost = heartbeat(run_dir, second, 2)  # the second node of the continuing job: ranks 2 and 3
        ranks = [lost["pid"], heartbeat(run_dir, second, 3)["pid"]]
        step_daemon = int(subprocess.check_output(["ps", "-o", "ppid=", "-p", str(lost["pid"])]))  # slurmstepd
        slurmd = int((REPO / ".slurm-local" / "run" / f"slurmd-{lost['node']}.pid").read_text())
        for pid in (slurmd, step_daemon, *ranks):  # the node is gone: its daemon, the job step and the ranks
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        third = next_job(run_dir, second)
        second_named = records(run_dir)[1]
        # Two of the four nodes are suspects now: a third fault leaves one healthy node, and 1 x 2 processes
        # still divide the run's 4 virtual ranks, so the run goes on there rather than pending for two.
        wait_until(lambda: heartbeat(run_dir, third, 2)["step"] >= second_named["resume_step"] + 2, JOB_TIMEOUT_S,
                   f"job {third} training")
        again = heartbeat(run_dir, third, 2)
        os.kill(again["pid"], signal.SIGSTOP)
        fourth = next_job(run_dir, third)
        wait_for_end(fourth, run_dir)
    finally:
        if killed:
            start_cluster()  # the lost node's slurmd again, so that later tests find four nodes
    assert second_named["kind"] == "silent" and second_named["ranks"] == [2, 3], second_named
    assert second_named["exclude"] == sorted({hung["node"], lost["node"]}) and second_named["new_job"] == third
    assert not nodes_of(third) & {hung["node"], lost["node"]}
    third_named = records(run_dir)[2]
    suspects = {hung["node"], lost["node"], again["node"]}
    assert third_named["ranks"] == [2] and third_named["exclude"] == sorted(suspects), third_named
    assert third_named["new_job"] == fourth and third_named["new_nodes"] == 1, third_named
    assert len(nodes_of(fourth)) == 1 and not nodes_of(fourth) & suspects
    resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes == [named["resume_step"], second_named["resume_step"], third_named["resume_step"]]
    shapes = [json.loads(line) for line in (run_dir / "shapes.jsonl").read_text().splitlines()]
    assert [(r["job"], r["nodes"], r["world_size"], r["virtual_ranks"], r["hosted"]) for r in shapes] == [
        (first, 2, 4, 4, 1), (second, 2, 4, 4, 1), (third, 2, 4, 4, 1), (fourth, 1, 2, 4, 2)], shapes
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))
    listed = senet_jobs(capsys)
    assert f"-> continued as job {second} without {hung['node']}" in listed[first]
    assert f"-> continued as job {third} without " in listed[second]
    assert f"-> continued as job {fourth} without " in listed[third] and "on 1 of its 2 nodes" in listed[third]


def test_a_nan_loss_stops_the_run_once_in_one_line_and_senet_jobs_says_why(
        cluster: dict[str, str], workspace: Path, capsys: pytest.CaptureFixture) -> None:
    job_id, run_dir = submit(workspace, "--set", "optim.lr=1.0e+30")  # the weights explode at the first step
    wait_until(lambda: not in_queue(job_id), JOB_TIMEOUT_S, f"job {job_id} leaving the queue")
    wait_until(lambda: sacct_states(job_id) == ["FAILED"], 15, f"sacct reporting job {job_id} FAILED")
    (stopped,) = records(run_dir)
    assert stopped["action"] == "stopped" and stopped["reason"] == "deterministic (NonFiniteLoss): not retried"
    assert json.loads((run_dir / "job.json").read_text())["jobs"] == [job_id]  # nothing was submitted after it
    logs = [p.read_text() for p in sorted((run_dir / "logs").glob(f"{job_id}_*_log.err"))]
    said = [line for log in logs for line in log.splitlines() if "the run stops" in line]
    assert len(said) == 1 and "NonFiniteLoss: loss is not finite" in said[0], said
    assert not any("Traceback" in log for log in logs)
    assert "run stopped: deterministic (NonFiniteLoss): not retried" in senet_jobs(capsys)[job_id]


def test_a_run_preempted_on_the_cancel_partition_continues_in_its_own_next_job_and_names_its_slow_rank(
        cluster: dict[str, str], workspace: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENET_TEST_SLOW_RANK", "3:0.5")  # the jobs inherit it: rank 3 sleeps 0.5 s after each step
    first, run_dir = submit(workspace, "--partition", "cancel")
    assert ("preemption on partition cancel: Slurm cancels the job (PreemptMode=CANCEL); it checkpoints at the USR2 "
            "(GraceTime 10 s + KillWait 5 s) and submits the run's next job itself") in capsys.readouterr().out
    wait_until(lambda: steps_logged(run_dir) >= 2, JOB_TIMEOUT_S, f"job {first} training")
    urgent = preempt(first)
    second = next_job(run_dir, first)
    wait_for_end(second, run_dir)
    assert sacct_states(urgent) == ["COMPLETED"] and len(sacct_states(first)) == 1  # never requeued
    (preempted,) = records(run_dir)
    assert preempted["kind"] == "preempted" and preempted["mode"] == "CANCEL" and preempted["new_job"] == second
    resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes == [preempted["step"]] and 0 < preempted["step"] < EPOCHS * STEPS_PER_EPOCH
    assert_same_parameters(run_dir, request.getfixturevalue("reference"))

    slow = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "straggler"]
    assert slow and {r["rank"] for r in slow} == {3}, slow
    assert f"slow: rank 3 ({slow[-1]['node']}) kept the others waiting" in senet_jobs(capsys)[second]
    assert main(["logs", second, "--stream", "err"]) == 0
    assert "slow rank: rank 3 (node " in capsys.readouterr().out
