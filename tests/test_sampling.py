"""Specification of pipeline.sampling: Relay-BP class-aware order and shuffle, sharded and resumable."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.sampling import ClassAwareSampler, ShuffleSampler, relay_order, shuffle_order

# A long-tailed source: the largest class has 100x the images of the smallest.
COUNTS = [1000, 10, 300, 10, 57, 1, 120]
LABELS = np.repeat(np.arange(len(COUNTS)), COUNTS)
C = len(COUNTS)


def class_draws(order: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """The images of class c in the order they are drawn."""
    return order[labels[order] == c]


# --- Relay-BP: which classes and images are drawn -------------------------------------------------

def test_classes_are_delivered_uniformly_whatever_their_sizes() -> None:
    order = relay_order(LABELS, num_samples=len(LABELS), seed=0, epoch=0)
    delivered = LABELS[order]
    # Every class-list cycle holds each class exactly once ...
    full = len(order) // C * C
    for cycle in delivered[:full].reshape(-1, C):
        assert sorted(cycle) == list(range(C))
    # ... so after any m samples each class has been drawn within 1 of m / C times.
    seen = np.cumsum(delivered[:, None] == np.arange(C), axis=0)
    expected = np.arange(1, len(order) + 1)[:, None] / C
    assert np.abs(seen - expected).max() < 1


def test_every_image_of_a_class_is_drawn_before_any_image_repeats() -> None:
    order = relay_order(LABELS, num_samples=5000, seed=3, epoch=2)  # small classes cycle many times
    for c, size in enumerate(COUNTS):
        draws = class_draws(order, LABELS, c)
        members = np.flatnonzero(LABELS == c)
        for start in range(0, len(draws), size):
            one_pass = draws[start:start + size]
            assert len(set(one_pass.tolist())) == len(one_pass)  # no repeat inside one pass of the list
            if len(one_pass) == size:
                assert sorted(one_pass) == members.tolist()  # a full pass is the whole class


def test_image_lists_are_reshuffled_between_passes() -> None:
    order = relay_order(LABELS, num_samples=5000, seed=0, epoch=0)
    draws = class_draws(order, LABELS, c=1)  # 10 images, drawn ~700 times
    passes = {tuple(draws[i:i + 10]) for i in range(0, len(draws) - 9, 10)}
    assert len(passes) > 60  # fresh permutations, not one list repeated


def test_classes_without_images_are_never_drawn() -> None:
    labels = np.array([5, 0, 5, 2, 0, 5])  # classes 1, 3, 4 have no images
    sampler = ClassAwareSampler(labels, samples_per_epoch=30)
    assert sampler.num_classes == 3
    delivered = labels[sampler.global_order(0)]
    assert set(delivered) == {0, 2, 5}
    assert all(sorted(cycle) == [0, 2, 5] for cycle in delivered.reshape(-1, 3))


def test_shuffle_is_a_permutation_or_permutations_back_to_back() -> None:
    assert sorted(shuffle_order(100, 100, seed=0, epoch=0)) == list(range(100))
    longer = shuffle_order(100, 250, seed=0, epoch=0)
    assert [sorted(longer[i:i + 100]) for i in (0, 100)] == [list(range(100))] * 2
    assert len(set(longer[200:].tolist())) == 50


# --- Determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda **kw: ClassAwareSampler(LABELS, **kw),
                                  lambda **kw: ShuffleSampler(LABELS, **kw)], ids=["class_aware", "shuffle"])
def test_order_is_a_pure_function_of_seed_and_epoch(make) -> None:
    order = make(seed=7).global_order(4)
    assert np.array_equal(order, make(seed=7).global_order(4))  # another process computes the same
    assert np.array_equal(order, make(seed=7, num_replicas=5, rank=2).global_order(4))  # any world size
    assert not np.array_equal(order, make(seed=7).global_order(5))  # next epoch: another order
    assert not np.array_equal(order, make(seed=8).global_order(4))  # other seed: another order


def test_relay_order_is_what_the_sampler_uses() -> None:
    sampler = ClassAwareSampler(LABELS, seed=1, samples_per_epoch=2000)
    assert np.array_equal(sampler.global_order(3), relay_order(LABELS, 2000, seed=1, epoch=3))


# --- Sharding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", range(1, 9))
def test_ranks_get_disjoint_equal_shards_that_interleave_to_the_global_order(world: int) -> None:
    samplers = [ClassAwareSampler(LABELS, num_replicas=world, rank=r, seed=0) for r in range(world)]
    total = len(LABELS) // world * world  # the tail (< world samples) is dropped
    shards = [list(s) for s in samplers]
    assert all(len(shard) == len(s) == total // world for shard, s in zip(shards, samplers))
    assert all(isinstance(i, int) for i in shards[-1])
    # Rank r's k-th sample is global position k * world + r: each step's global batch is a
    # contiguous window of the global order, and the shards together are its first `total` samples.
    interleaved = np.array(shards).T.ravel()
    assert np.array_equal(interleaved, samplers[0].global_order(0)[:total])
    positions = np.concatenate([s.global_positions() for s in samplers])
    assert sorted(positions) == list(range(total))
    assert samplers[-1].global_position(3) == 3 * world + world - 1


def test_each_rank_stream_is_balanced_within_a_class_list_cycle() -> None:
    # Any m consecutive samples of one rank come from a global window of (m - 1) * world + 1
    # positions; when that is at most C it touches at most two class-list cycles, so no class
    # appears more than twice (a rank's mini-batch is spread over classes like the global one).
    labels = np.repeat(np.arange(100), np.linspace(5, 200, 100).astype(int))
    world, m = 4, 25
    for rank in range(world):
        stream = labels[ClassAwareSampler(labels, num_replicas=world, rank=rank).rank_indices(0)]
        for start in range(len(stream) - m + 1):
            assert np.bincount(stream[start:start + m]).max() <= 2


# --- Resume ---------------------------------------------------------------------------------------

def test_state_dict_mid_epoch_continues_exactly() -> None:
    sampler = ClassAwareSampler(LABELS, num_replicas=3, rank=1, seed=5)
    sampler.set_epoch(2)
    stream = iter(sampler)
    first = [next(stream) for _ in range(40)]
    state = sampler.state_dict()

    resumed = ClassAwareSampler(LABELS, num_replicas=3, rank=1, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call keeps the resume position
    assert first + list(resumed) == sampler.rank_indices(2).tolist()
    assert len(list(resumed)) == len(resumed)  # iterating again starts the epoch over
    resumed.set_epoch(3)
    assert list(resumed) == sampler.rank_indices(3).tolist()


def test_state_dict_can_record_what_was_consumed_rather_than_prefetched() -> None:
    sampler = ShuffleSampler(len(LABELS), num_replicas=2, rank=0)
    stream = iter(sampler)
    for _ in range(50):  # a loader prefetched 50 indices but trained on 32
        next(stream)
    resumed = ShuffleSampler(len(LABELS), num_replicas=2, rank=0)
    resumed.load_state_dict(sampler.state_dict(consumed=32))
    assert list(resumed) == sampler.rank_indices(0)[32:].tolist()


@pytest.mark.parametrize("new_world", [1, 3, 8])
def test_resume_with_another_world_size_continues_the_global_order(new_world: int) -> None:
    old = [ClassAwareSampler(LABELS, num_replicas=4, rank=r, seed=9) for r in range(4)]
    used = []
    for s in old:
        s.set_epoch(1)
        stream = iter(s)
        used.append([next(stream) for _ in range(6)])  # global position 24
    state = old[0].state_dict()
    assert state["global_position"] == 24

    new = [ClassAwareSampler(LABELS, num_replicas=new_world, rank=r, seed=9) for r in range(new_world)]
    for s in new:
        s.load_state_dict(state)
    rest = np.array([list(s) for s in new]).T.ravel()
    before = np.array(used).T.ravel()
    total = len(LABELS) // new_world * new_world
    assert np.array_equal(np.concatenate([before, rest]), old[0].global_order(1)[:total])


def test_resume_at_a_position_the_new_world_size_does_not_divide_is_refused() -> None:
    sampler = ClassAwareSampler(LABELS, num_replicas=4, rank=0)
    sampler.load_state_dict({**sampler.state_dict(), "global_position": 24})
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"global position 24 .*num_replicas=5"):
        ClassAwareSampler(LABELS, num_replicas=5, rank=0).load_state_dict(state)


@pytest.mark.parametrize("change, message", [
    (dict(seed=1), "seed=0 but this run has seed=1"),
    (dict(samples_per_epoch=500), "samples_per_epoch"),
    (dict(labels=LABELS[:-1]), "dataset_size"),
    (dict(labels=LABELS[::-1].copy()), "order differs"),
])
def test_resume_into_a_different_run_is_refused(change: dict, message: str) -> None:
    state = ClassAwareSampler(LABELS).state_dict()
    kwargs = {"labels": LABELS, **change}
    with pytest.raises(ValueError, match=message):
        ClassAwareSampler(**kwargs).load_state_dict(state)
    with pytest.raises(ValueError, match="ClassAwareSampler"):
        ShuffleSampler(LABELS).load_state_dict(state)


# --- Arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(num_replicas=0), "num_replicas=0"),
    (dict(num_replicas=4, rank=4), "rank=4"),
    (dict(rank=-1), "rank=-1"),
    (dict(seed=-3), "seed=-3"),
    (dict(num_replicas=8, samples_per_epoch=7), "samples_per_epoch=7"),
])
@pytest.mark.parametrize("sampler", [ClassAwareSampler, ShuffleSampler])
def test_bad_arguments_raise_value_error_naming_the_value(sampler, kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        sampler(LABELS, **kwargs)


@pytest.mark.parametrize("labels, named", [
    ([], "shape"), ([0, -2, 1], "-2 at position 1"), ([0.5, 1.0], "float64")])
def test_bad_labels_raise_value_error_naming_the_value(labels: list, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ClassAwareSampler(labels)


def test_empty_data_set_and_bad_epoch_raise_value_error() -> None:
    with pytest.raises(ValueError, match="dataset size=0"):
        ShuffleSampler(0)
    with pytest.raises(ValueError, match="epoch=-1"):
        ShuffleSampler(10).set_epoch(-1)
