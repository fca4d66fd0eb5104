"""Where a process runs: the CPU share, the GPU index, threads and precision, and the node checks.

The host is described explicitly (`HostCpus`, a GPU count, an environment), so each rule is checked
for the machines it is written for, not only for this 2-core sandbox.
"""
from __future__ import annotations

import logging

import pytest

from pipeline.dali import HW_DECODER_LOAD, decoder_options, pinned_decoder_bytes
from training.config import ConfigError, DataConfig, load_config
from training.ranks import DistInfo
from training.placement import HostCpus, PlacementError, check_node, cpu_share, input_shm_bytes, place, place_run


def ranks(local: int, rank: int = 0) -> dict[str, str]:
    """torchrun's variables for local rank `rank` of `local` ranks on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(local), "LOCAL_WORLD_SIZE": str(local)}


@pytest.mark.parametrize("cpus, local, slurm, share", [
    (HostCpus(affinity=64, allowed=64), 8, None, 8),  # unbound: the mask is shared by every local rank
    (HostCpus(affinity=8, allowed=64), 8, None, 8),  # bound one task per 8 cores: the mask is this rank's own
    (HostCpus(affinity=32, allowed=64), 8, None, 8),  # bound to a socket of two: 4 ranks share it
    (HostCpus(affinity=64, allowed=64), 8, 6, 6),  # capped at SLURM_CPUS_PER_TASK
    (HostCpus(affinity=64, allowed=64, quota=16.0), 8, None, 2),  # a container's --cpus=16 shared by 8 ranks
    (HostCpus(affinity=2, allowed=2), 3, None, 1),  # more ranks than cores: at least one each
])
def test_cpu_share_divides_the_mask_among_the_ranks_bound_to_it(cpus: HostCpus, local: int, slurm: int | None,
                                                                share: int) -> None:
    got, how = cpu_share(cpus, local, slurm)
    assert got == share and how


def test_predict_with_three_ranks_on_two_cores_starts_one_thread_per_rank() -> None:
    """`senet predict --nproc 3` here: each rank's DALI pool and torch get one core, not all of them."""
    for rank in range(3):
        p = place("cpu", dist=DistInfo.from_env(ranks(3, rank)), env=ranks(3, rank), cpus=HostCpus(2, 2))
        assert (p.cpus, p.dali_threads, p.torch_threads) == (1, 1, 1)


@pytest.mark.parametrize("gpus, local, index", [(8, 8, [0, 1, 2, 3, 4, 5, 6, 7]), (1, 8, [0] * 8), (2, 4, [0, 1, 0, 1])])
def test_gpu_index_is_the_local_rank_modulo_the_visible_gpus(gpus: int, local: int, index: list[int]) -> None:
    """All GPUs visible to every task, one per task (each sees its own as 0), or a few per task."""
    got = [place("gpu", env=ranks(local, r), cpus=HostCpus(80, 80), gpus=gpus).gpu_index for r in range(local)]
    assert got == index


def test_a_gpu_placement_without_a_gpu_is_one_line_naming_the_fix() -> None:
    with pytest.raises(PlacementError, match="sees no CUDA device.*train.device=cpu") as e:
        place("gpu", env={"CUDA_VISIBLE_DEVICES": ""}, gpus=0)
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)


def test_placement_of_a_training_rank_follows_the_config() -> None:
    env = {**ranks(8, 5), "SLURM_CPUS_PER_TASK": "10"}
    cfg = load_config(None, ["train.device=gpu", "data.py_workers=2"])
    p = place_run(cfg, env=env, cpus=HostCpus(80, 80), gpus=8)
    assert (p.backend, p.control_backend, p.gpu_index, p.cpus, p.dali_threads, p.py_workers) == ("nccl", "gloo", 5, 10, 8, 2)
    assert p.precision.name == "bf16" and p.torch_device.type == "cuda" and "cuda:5" in p.describe()
    cpu = place("cpu", precision="auto", threads=3, env=ranks(2), cpus=HostCpus(8, 8))
    assert (cpu.backend, cpu.gpu_index, cpu.dali_threads, cpu.torch_threads, cpu.precision.name) == ("gloo", None, 3, 4, "fp32")


def test_pinned_decoder_memory_of_a_ten_core_task_stays_within_one_gib() -> None:
    """Train and eval pipelines of one rank with slurm.cpus_per_task=10 (8 DALI threads + 2 workers)."""
    env = {**ranks(8), "SLURM_CPUS_PER_TASK": "10"}
    p = place("gpu", py_workers=2, env=env, cpus=HostCpus(80, 80), gpus=8)
    decoder = decoder_options("gpu", p.dali_threads)
    assert decoder["hw_decoder_load"] == HW_DECODER_LOAD and decoder["device"] == "mixed" and not decoder["affine"]
    assert 2 * pinned_decoder_bytes(decoder, p.dali_threads) <= 2**30
    assert decoder_options("gpu", 8, 0.0)["hw_decoder_load"] == 0.0  # passed always, even when off
    assert DataConfig().hw_decoder_load == HW_DECODER_LOAD  # the config's default is the pipeline's


def test_too_little_shared_memory_is_one_line_naming_the_fix(tmp_path) -> None:
    p = place("cpu", py_workers=2, env=ranks(8), cpus=HostCpus(16, 16))
    need = input_shm_bytes(p, batch_size=256, sample_bytes=110_000, prefetch=2)
    assert need > 8 * 256 * 110_000  # eight ranks' batches in flight, at least one each
    with pytest.raises(PlacementError, match=r"has .* MiB free .*--shm-size.*data.py_workers") as e:
        check_node(p, shm_needed=2**62, pinned_needed=0, shm=str(tmp_path))
    assert "\n" not in str(e.value)
    check_node(p, shm_needed=1024, pinned_needed=0, shm=str(tmp_path))  # enough: silent
    no_workers = place("cpu", py_workers=0, env=ranks(8), cpus=HostCpus(16, 16))
    assert input_shm_bytes(no_workers, 256, 110_000, 2) == 0


def test_a_low_locked_memory_limit_is_a_warning_on_gpu(caplog: pytest.LogCaptureFixture) -> None:
    p = place("gpu", env=ranks(1), cpus=HostCpus(16, 16), gpus=1)
    with caplog.at_level(logging.WARNING, logger="senet.placement"):
        check_node(p, shm_needed=0, pinned_needed=2**30, memlock=64 * 1024)
    assert "ulimit -l" in caplog.text and "64 KiB" in caplog.text


def test_data_device_is_read_as_train_device_with_a_warning(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  device: cpu\n  crop_size: 64\n")
    with caplog.at_level(logging.WARNING, logger="senet.config"):
        cfg = load_config(old)
    assert cfg.train.device == "cpu" and cfg.data.crop_size == 64 and "data.device is deprecated" in caplog.text
    assert load_config(old, ["data.device=gpu"]).train.device == "gpu"  # an old override still wins
    assert load_config(None, ["data.device=cpu"]).train.device == "cpu"
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  device: cpu\ntrain:\n  device: gpu\n")
    with pytest.raises(ConfigError, match="data.device = 'cpu' .* contradicts train.device = 'gpu'"):
        load_config(both)


def test_an_old_checkpoint_config_with_data_device_still_loads() -> None:
    from training.config import config_from_dict, config_to_dict

    raw = config_to_dict(load_config(None, ["train.device=cpu"]))
    del raw["train"]["device"]
    del raw["data"]["hw_decoder_load"]
    raw["data"]["device"] = "cpu"  # as the first round's checkpoints stored it
    assert config_from_dict(raw, "old.pt").train.device == "cpu"


def test_two_ranks_on_one_physical_gpu_are_named() -> None:
    """Compared by UUID: two tasks that each see 'their' GPU as cuda:0 may still share one."""
    from training.dist import shared_gpu

    own = [(0, "n1", "GPU-a", 0), (1, "n1", "GPU-b", 1), (2, "n2", "GPU-c", 0)]
    assert shared_gpu(own) is None
    clash = shared_gpu(own + [(3, "n2", "GPU-c", 0)])
    assert clash and "ranks 2 and 3 on n2 both use GPU GPU-c" in clash and "\n" not in clash
