"""Sample order for training: class-aware (Relay-BP) or a plain shuffle, sharded over ranks, resumable.

Every epoch's **global order** is a pure function of (seed, epoch, dataset, samples_per_epoch): each
random choice comes from its own keyed generator, so every rank computes the same order without
communication, and a resumed run needs only (epoch, position), no RNG state.

Sharding is **interleaved**: rank r's k-th sample is global position ``k * num_replicas + r``. So after
every rank has taken k samples, the samples used are exactly the first ``k * num_replicas`` of the
global order: a checkpoint stores that global position P, and the same shards continue from it. A
training run keeps its number of shards for its whole life (its virtual ranks, training.virtual): a
process may read several of them (`for_rank`: siblings that share each epoch's order), so any number
of processes that divides the shards continues the same batches; W' shards of their own would continue
from sample P too, when W' divides P, but each would hold other samples than before.
(Contiguous per-rank slices cannot do this: their consumed samples are W separate prefixes, not one.)
It also makes each step's global batch a contiguous window of the global order, which is the
mini-batch that Relay-BP balances. A rank's own m consecutive samples come from a global window of
(m - 1) * num_replicas + 1 positions; while that is at most the number of classes C it touches at most
two class-list cycles, so no class appears more than twice in a rank's mini-batch. Over windows much
longer than C / num_replicas a rank's stream is only as even as a random draw (measured in
benchmarks/RESULTS_sampling.md: contiguous slices would spread a rank's long-run stream better and
the global batch worse).

Each epoch uses ``samples_per_epoch`` rounded DOWN to a multiple of ``num_replicas`` (at most
``num_replicas - 1`` samples dropped from the end), so every rank gets exactly the same number of
samples and no rank waits for another at the last step.

Orders are drawn with numpy's ``Generator`` (PCG64); numpy does not promise identical streams across
releases, so a checkpoint stores a checksum of the epoch's order and a resume under a different
order (other numpy, other data set) is refused instead of silently repeating or skipping samples.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ClassAwareSampler", "ShuffleSampler", "relay_order", "shuffle_order"]

STATE_FORMAT = 1

# Stream numbers keep the generators of one (seed, epoch) independent of each other.
_CLASS_LIST_STREAM = 0  # the shuffled class lists of Relay-BP
_IMAGE_LIST_STREAM = 1  # one stream per class (keyed by its label) for its shuffled image lists
_SHUFFLE_STREAM = 2  # ShuffleSampler's permutations


def _rng(seed: int, epoch: int, stream: int, key: int = 0) -> np.random.Generator:
    """The generator for one (seed, epoch, stream, key): a pure function of its arguments."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, stream, key)))


def _reshuffled_lists(rng: np.random.Generator, size: int, length: int) -> np.ndarray:
    """First `length` items of back-to-back independent permutations of range(size)."""
    lists = np.tile(np.arange(size, dtype=np.intp), (-(-length // size), 1))
    rng.permuted(lists, axis=1, out=lists)  # Fisher-Yates on each row: exact uniform permutations
    return lists.ravel()[:length]


def _check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    """`value` as an int >= minimum, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}; {fix}")
    return int(value)


@dataclass(frozen=True, eq=False)
class _ClassLists:
    """The data set grouped by class: the images of classes[i] are members[offsets[i]:offsets[i] + sizes[i]]."""

    classes: np.ndarray  # labels that have at least one image, ascending
    members: np.ndarray  # dataset indices, grouped by class, ascending within a class
    offsets: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> _ClassLists:
        # A stable sort of 16-bit keys is a radix sort: ~10x faster than int64 for 1.28 M labels.
        keys = labels.astype(np.uint16) if labels.max() < 2**16 else labels
        members = np.argsort(keys, kind="stable")
        classes, offsets, sizes = np.unique(labels[members], return_index=True, return_counts=True)
        return cls(classes, members, offsets, sizes)

    def relay_order(self, num_samples: int, seed: int, epoch: int) -> np.ndarray:
        """Relay-BP order of `num_samples` dataset indices (see `relay_order`)."""
        num_classes = len(self.classes)
        cycles = -(-num_samples // num_classes)  # class-list cycles this epoch (the last may be partial)
        slots = _reshuffled_lists(_rng(seed, epoch, _CLASS_LIST_STREAM), num_classes, num_samples)
        # Every class-list cycle holds each class exactly once, so a sample in cycle k is the k-th
        # draw from its class: it takes item k of that class's back-to-back reshuffled image lists.
        draw = np.arange(num_samples, dtype=np.intp) // num_classes
        image_lists = np.empty((num_classes, cycles), dtype=np.intp)
        for slot, (label, size) in enumerate(zip(self.classes.tolist(), self.sizes.tolist())):
            # Keyed by the label, not the slot: a class's image order does not move when another
            # class gains or loses all its images. A loop over classes costs ~40 us per class.
            rng = _rng(seed, epoch, _IMAGE_LIST_STREAM, label)
            image_lists[slot] = _reshuffled_lists(rng, size, cycles)
        return self.members[self.offsets[slots] + image_lists[slots, draw]]


def _as_labels(labels: ArrayLike) -> np.ndarray:
    """Labels as a 1-D int64 array of class indices >= 0, or a ValueError naming the fault."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of class indices; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {array.dtype}")
    if array.min() < 0:
        bad = int(np.argmax(array < 0))
        raise ValueError(f"labels must be class indices >= 0; got {int(array[bad])} at position {bad}")
    return array.astype(np.int64, copy=False)


def relay_order(labels: ArrayLike, num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Class-aware order of Relay backpropagation (Shen et al., 2016), a pure function of its arguments.

    For each sample, take the next class from a shuffled list of the classes that have images, then the
    next image from that class's shuffled list; a list is reshuffled when it runs out. Both restart at
    every epoch. Over an epoch each class is drawn floor or ceil of num_samples / num_classes times,
    whatever its size: small classes repeat their images, large ones leave some out.

    Args:
        labels: class index (>= 0) of every dataset item; classes without items are never drawn.
        num_samples: length of the order.
        seed: run seed (>= 0).
        epoch: epoch number (>= 0).

    Returns:
        int64 array of `num_samples` dataset indices.
    """
    num_samples = _check_int("num_samples", num_samples, 1, "ask for at least one sample")
    return _ClassLists.from_labels(_as_labels(labels)).relay_order(
        num_samples, _check_int("seed", seed, 0, "use a non-negative seed"),
        _check_int("epoch", epoch, 0, "epochs count from 0"))


def shuffle_order(dataset_size: int, num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Random permutations of range(dataset_size), back to back, cut to `num_samples`: a pure function.

    Returns:
        int64 array of `num_samples` dataset indices.
    """
    dataset_size = _check_int("dataset_size", dataset_size, 1, "the data set is empty")
    num_samples = _check_int("num_samples", num_samples, 1, "ask for at least one sample")
    rng = _rng(_check_int("seed", seed, 0, "use a non-negative seed"),
               _check_int("epoch", epoch, 0, "epochs count from 0"), _SHUFFLE_STREAM)
    return _reshuffled_lists(rng, dataset_size, num_samples).astype(np.int64)


class _OrderCache:
    """The global order of the epoch last asked for (mutable, so that siblings of one sampler share it)."""

    def __init__(self) -> None:
        self.epoch = -1
        self.order: np.ndarray | None = None


class _ShardedSampler:
    """Shards a per-epoch global order over ranks and keeps a resumable position (shared by both samplers)."""

    def __init__(self, dataset_size: int, num_replicas: int, rank: int, seed: int,
                 samples_per_epoch: int | None) -> None:
        self.num_replicas = _check_int("num_replicas", num_replicas, 1, "pass the world size (>= 1)")
        self.rank = _check_int("rank", rank, 0, "pass the global rank")
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank={rank} is out of range for num_replicas={num_replicas}; "
                             f"use a rank in 0..{num_replicas - 1}")
        self.seed = _check_int("seed", seed, 0, "use a non-negative seed")
        self.dataset_size = dataset_size
        if samples_per_epoch is None:
            samples_per_epoch = dataset_size
        self.samples_per_epoch = _check_int(
            "samples_per_epoch", samples_per_epoch, self.num_replicas,
            f"every one of the num_replicas={self.num_replicas} ranks needs at least one sample")
        self.num_samples = self.samples_per_epoch // self.num_replicas  # per rank; the tail is dropped
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self._position = 0  # samples of this rank handed out in this epoch
        self._next_start = 0  # where the next __iter__ starts: the resume point once, then 0
        self._orders = _OrderCache()  # shared with the siblings of `for_rank`

    def _order(self, epoch: int) -> np.ndarray:
        """The uncached global order of `epoch` (length samples_per_epoch)."""
        raise NotImplementedError

    def global_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's order over all ranks, before the tail is dropped.

        Args:
            epoch: epoch number (>= 0).

        Returns:
            Read-only int64 array of `samples_per_epoch` dataset indices; the first `total_size` are used.
        """
        epoch = _check_int("epoch", epoch, 0, "epochs count from 0")
        cache = self._orders
        if cache.order is None or cache.epoch != epoch:
            order = self._order(epoch)
            order.flags.writeable = False  # shared by every caller: nobody may shuffle it in place
            cache.epoch, cache.order = epoch, order
        return cache.order

    def for_rank(self, rank: int) -> _ShardedSampler:
        """The same sampler for another rank of the same world, at the start of this one's epoch, sharing its
        per-epoch order (one process that reads several ranks' shards computes each epoch's order once)."""
        rank = _check_int("rank", rank, 0, "pass the global rank")
        if rank >= self.num_replicas:
            raise ValueError(f"rank={rank} is out of range for num_replicas={self.num_replicas}; "
                             f"use a rank in 0..{self.num_replicas - 1}")
        sibling = copy.copy(self)
        sibling.rank, sibling._position, sibling._next_start = rank, 0, 0
        return sibling

    def global_positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Global position of this rank's samples start..stop-1 (default: all): the k-th is ``k * num_replicas + rank``.

        Key per-sample randomness (augmentation) on (seed, epoch, global position): it then does not
        depend on the world size, the prefetch depth or where a run was resumed.
        """
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        return np.arange(start, stop, dtype=np.int64) * self.num_replicas + self.rank

    def global_position(self, k: int) -> int:
        """Global position of this rank's k-th sample of the epoch (0 <= k < len(self))."""
        if not 0 <= k < self.num_samples:
            raise ValueError(f"sample k={k} is out of range; this rank has {self.num_samples} per epoch")
        return int(k) * self.num_replicas + self.rank

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for the whole of `epoch`, in order (length len(self))."""
        return self.global_order(epoch)[self.rank:self.total_size:self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at its beginning, the epoch just resumed keeps its position."""
        epoch = _check_int("epoch", epoch, 0, "epochs count from 0")
        if epoch != self.epoch:
            self.epoch, self._position, self._next_start = epoch, 0, 0

    @property
    def position(self) -> int:
        """Samples of this rank handed out so far in the current epoch."""
        return self._position

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        start, self._next_start = self._next_start, 0  # iterating the same epoch again starts over
        self._position = start
        for k, index in enumerate(self.rank_indices(self.epoch)[start:].tolist(), start + 1):
            self._position = k  # counted when handed out: a consumer that stops here has it
            yield index

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Resumable state: the epoch and the GLOBAL position, plus what the order depends on.

        Args:
            consumed: samples of this rank actually used in this epoch. Pass it when a loader
                prefetches (the sampler has then run ahead); it defaults to those handed out.

        Returns:
            A dict of plain Python values (safe for torch.save and JSON).
        """
        consumed = self._position if consumed is None else consumed
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is out of range; this rank has {self.num_samples} per epoch")
        return {
            "format": STATE_FORMAT,
            "sampler": type(self).__name__,
            "epoch": self.epoch,
            "global_position": consumed * self.num_replicas,  # all ranks consume in step
            "num_replicas": self.num_replicas,  # informative only: a resume may use another world size
            "seed": self.seed,
            "samples_per_epoch": self.samples_per_epoch,
            "dataset_size": self.dataset_size,
            "order_crc32": zlib.crc32(self.global_order(self.epoch).tobytes()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global position of the saved epoch, with this sampler's world size.

        Raises:
            ValueError: the state comes from another kind of sampler, seed, epoch length or data set,
                or its global position is not a multiple of this sampler's num_replicas.
        """
        if state.get("format") != STATE_FORMAT or state.get("sampler") != type(self).__name__:
            raise ValueError(f"cannot load sampler state {state.get('sampler')!r} (format {state.get('format')!r}) "
                             f"into {type(self).__name__} (format {STATE_FORMAT})")
        for key in ("seed", "dataset_size", "samples_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this run has {key}="
                                 f"{getattr(self, key)}; resume with the checkpoint's {key} or start a new run")
        epoch = _check_int("epoch", state["epoch"], 0, "the sampler state is corrupt")
        position = _check_int("global_position", state["global_position"], 0, "the sampler state is corrupt")
        if zlib.crc32(self.global_order(epoch).tobytes()) != state["order_crc32"]:
            raise ValueError(f"epoch {epoch}'s sample order differs from the checkpoint's (other labels or "
                             f"another numpy release); resuming would repeat and skip samples")
        if position >= self.total_size:
            start = self.num_samples  # nothing of this epoch is left for this world size
        elif position % self.num_replicas:
            raise ValueError(
                f"cannot resume at global position {position} with num_replicas={self.num_replicas}: "
                f"{position} is not a multiple of {self.num_replicas}; resume with a world size that "
                f"divides it (the checkpoint's was {state['num_replicas']}) or from an epoch boundary")
        else:
            start = position // self.num_replicas
        self.epoch, self._position, self._next_start = epoch, start, start


class ClassAwareSampler(_ShardedSampler):
    """Relay-BP class-aware order (see `relay_order`), sharded over ranks, resumable mid-epoch.

    Shaped like torch's DistributedSampler: a DataLoader takes it as `sampler=`; call `set_epoch`
    before each epoch. Iteration yields this rank's dataset indices from the current position.

    Args:
        labels: class index (>= 0) of every dataset item; classes without items are never drawn.
        num_replicas: world size (all ranks, all nodes).
        rank: global rank of this process.
        seed: run seed; the same on every rank.
        samples_per_epoch: global samples per epoch, rounded down to a multiple of num_replicas;
            defaults to the data set size.
    """

    def __init__(self, labels: ArrayLike, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 samples_per_epoch: int | None = None) -> None:
        labels = _as_labels(labels)
        super().__init__(len(labels), num_replicas, rank, seed, samples_per_epoch)
        self._lists = _ClassLists.from_labels(labels)

    @property
    def num_classes(self) -> int:
        """Classes that have at least one image (the length of a class-list cycle)."""
        return len(self._lists.classes)

    def _order(self, epoch: int) -> np.ndarray:
        return self._lists.relay_order(self.samples_per_epoch, self.seed, epoch)


class ShuffleSampler(_ShardedSampler):
    """A fresh random permutation of the data set each epoch, sharded and resumable like ClassAwareSampler.

    Args:
        labels_or_len: the data set size, or any sequence as long as the data set (e.g. its labels).
        num_replicas: world size (all ranks, all nodes).
        rank: global rank of this process.
        seed: run seed; the same on every rank.
        samples_per_epoch: global samples per epoch (permutations back to back when larger than the
            data set), rounded down to a multiple of num_replicas; defaults to the data set size.
    """

    def __init__(self, labels_or_len: int | ArrayLike, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 samples_per_epoch: int | None = None) -> None:
        size = labels_or_len if isinstance(labels_or_len, (int, np.integer)) else len(labels_or_len)
        super().__init__(_check_int("dataset size", size, 1, "the data set is empty"),
                         num_replicas, rank, seed, samples_per_epoch)

    def _order(self, epoch: int) -> np.ndarray:
        return shuffle_order(self.dataset_size, self.samples_per_epoch, self.seed, epoch)
