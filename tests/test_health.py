"""How a failed or slow rank is named: the verdicts of `training.health` and the slow-rank rule of
`training.stragglers`, from heartbeats and waits as the ranks record them.

The real faults (SIGSTOP, SIGKILL, an injected slow rank in real gloo processes) are in
tests/test_train_cli.py and, under Slurm, tests/test_slurm_jobs.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from training.config import ConfigError
from training.engine import NonFiniteLoss
from training.health import Beat, RankInfo, describe, diagnose, heartbeat_interval, is_collective_error, own_verdict
from training.stragglers import slow_down_from_env, slowest

INFOS = {r: RankInfo(r, f"node{1 + r // 2}", "gpu-host", 1000 + r) for r in range(4)}
GLOO_CLOSED = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:7343")


def beat(rank: int, step: int, state: str = "running", error: str = "") -> Beat:
    info = INFOS[rank]
    return Beat(rank, info.node, info.host, info.pid, step, seq=7, state=state, error=error, session="s")


def test_a_silent_rank_is_named_with_its_node_host_pid_and_the_last_step_it_took_part_in() -> None:
    # its last heartbeat said step 10; under DDP it took part in every step rank 0 finished (14)
    verdict = diagnose(INFOS[0], 14, {1: beat(1, 14), 2: beat(2, 14), 3: beat(3, 10)}, {3: 12.4}, INFOS)
    assert verdict.kind == "silent" and verdict.ranks == (3,) and verdict.nodes == ("node2",) and verdict.steps == (14,)
    assert verdict.message == ("rank 3 (node node2, host gpu-host, pid 1003; last step 14) stopped answering: hung or "
                               "dead, no heartbeat for 12 s; rank 0 stops after step 14")


def test_a_dead_rank_whose_connection_closed_is_called_dead() -> None:
    verdict = diagnose(INFOS[2], 8, {0: beat(0, 8), 1: beat(1, 8), 3: beat(3, 8)}, {1: 3.0}, INFOS, GLOO_CLOSED)
    assert verdict.ranks == (1,) and "stopped answering: dead (its connection closed)" in verdict.message


def test_a_rank_that_raised_is_blamed_not_the_ranks_whose_collective_failed_after_it() -> None:
    beats = {1: beat(1, 5), 2: beat(2, 5, "error", "DataError: train/n01/x.JPEG: not a JPEG"), 3: None}
    verdict = diagnose(INFOS[0], 5, beats, {3: 3.0}, INFOS, GLOO_CLOSED)
    assert verdict.kind == "error" and verdict.ranks == (2,) and verdict.error.startswith("DataError")
    assert "rank 2 (node node2, host gpu-host, pid 1002; last step 5) failed: DataError" in verdict.message


def test_a_rank_that_still_beats_but_fell_behind_is_named_when_the_collective_times_out() -> None:
    verdict = diagnose(INFOS[0], 9, {1: beat(1, 9), 2: beat(2, 8), 3: beat(3, 9)}, {}, INFOS, "Timed out waiting 30000ms")
    assert verdict.kind == "stuck" and verdict.ranks == (2,) and "fell behind" in verdict.message


def test_a_collective_that_failed_while_every_rank_answers_names_nobody() -> None:
    verdict = diagnose(INFOS[0], 9, {r: beat(r, 9) for r in (1, 2, 3)}, {}, INFOS, "Timed out waiting 30000ms")
    assert verdict.kind == "collective" and verdict.ranks == () and "every rank still answers" in verdict.message


def test_an_exception_of_a_ranks_own_carries_its_classes_for_the_deterministic_check() -> None:
    verdict = own_verdict(INFOS[1], 7, NonFiniteLoss("loss is not finite at step 7"))
    assert verdict.kind == "error" and verdict.error == "NonFiniteLoss: loss is not finite at step 7"
    assert verdict.error_types[:2] == ("NonFiniteLoss", "RuntimeError")
    assert not is_collective_error(NonFiniteLoss("x")) and is_collective_error(RuntimeError(GLOO_CLOSED))
    assert describe(ValueError("a\nb")) == "ValueError: a"


def test_heartbeats_come_every_second_for_short_timeouts_and_at_most_every_five_seconds() -> None:
    assert heartbeat_interval(10) == 1 and heartbeat_interval(60) == 2 and heartbeat_interval(600) == 5


def test_the_rank_the_others_wait_for_is_named_when_last_in_most_steps_of_the_window() -> None:
    rng = np.random.default_rng(0)
    waits = rng.uniform(0.000, 0.010, size=(4, 8))
    waits[[0, 1, 3]] += 0.25  # everyone but rank 2 waits a quarter second per step
    found = slowest(waits, step_s=0.5)
    assert found is not None and found.rank == 2 and found.last_in == 8 and found.window == 8
    assert 0.24 < found.wait_s < 0.26


def test_a_rank_the_others_wait_for_every_other_step_is_named_at_its_average_cost() -> None:
    """A bursty input: in the steps between, the others wait for their own data, not at the collectives."""
    waits = np.tile([[1.0, 0.01], [1.0, 0.02], [0.0, 0.01], [1.0, 0.0]], 4)  # rank 2 costs 1 s every other step
    found = slowest(waits, step_s=1.1)
    assert found is not None and found.rank == 2 and found.last_in == 4 and found.window == 8
    assert found.wait_s == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("why, waits", [
    ("noise: milliseconds on a half-second step", np.random.default_rng(1).uniform(0, 0.01, size=(4, 8))),
    ("last in only half the steps", np.array([[0.3, 0.0, 0.3, 0.0], [0.0, 0.3, 0.0, 0.3]])),
])
def test_no_rank_is_named_for_noise_or_an_even_split(why: str, waits: np.ndarray) -> None:
    assert slowest(waits, step_s=0.5) is None, why


def test_the_slow_rank_test_hook_is_read_from_the_environment() -> None:
    env = {"SENET_TEST_SLOW_RANK": "1:0.25"}
    assert slow_down_from_env(1, env) == 0.25 and slow_down_from_env(0, env) == 0.0 and slow_down_from_env(1, {}) == 0
    with pytest.raises(ConfigError, match="SENET_TEST_SLOW_RANK='fast'.*RANK:SECONDS"):
        slow_down_from_env(1, {"SENET_TEST_SLOW_RANK": "fast"})
