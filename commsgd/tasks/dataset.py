"""The in-memory data set type shared by every task: spec, tensors and per-batch transforms.

Whole sets are small enough to keep in memory (CIFAR-10 as uint8 is 180 MB), so workers sample
batches by index with their own generator instead of going through a DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from commsgd.errors import ConfigError

TrainTransform = Callable[[Tensor, torch.Generator], Tensor]
"""Maps a gathered batch of stored samples to model inputs, with random augmentation."""

TestTransform = Callable[[Tensor], Tensor]
"""Maps a batch of stored samples to model inputs deterministically."""


def no_augmentation(x: Tensor, generator: torch.Generator) -> Tensor:
    """Train transform for sets stored ready to use (module-level so datasets stay picklable)."""
    return x


def unchanged(x: Tensor) -> Tensor:
    """Test transform for sets stored ready to use."""
    return x


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about its data: kind, per-sample input shape and output size."""

    name: str
    kind: Literal["image", "vector", "text"]
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or vocabulary size for text


def shard_bounds(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Half-open range of shard `(rank, world)` when `n` items are cut in `world` contiguous parts.

    The first `n % world` shards get one extra item, so every item is in exactly one shard.
    """
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"test shard (rank={rank}, world={world}) needs world >= 1 and 0 <= rank < world")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class Dataset:
    """A train and a test set held in memory, with the transforms that turn stored samples into inputs."""

    spec: DatasetSpec
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_transform: TrainTransform = field(default=no_augmentation)
    test_transform: TestTransform = field(default=unchanged)

    @property
    def num_train(self) -> int:
        """Number of training samples (indices for `train_batch` are in `[0, num_train)`)."""
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples over all shards."""
        return int(self.test_y.shape[0])

    def with_test_subset(self, samples: int, seed: int) -> Dataset:
        """This data set evaluated on `samples` test samples drawn at random (by `seed`, so the same on
        every worker and every run with that seed), kept in their stored order; all of them if fewer."""
        if samples >= self.num_test:
            return self
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(self.num_test, generator=generator)[:samples].sort().values
        return replace(self, test_x=self.test_x[keep], test_y=self.test_y[keep])

    def train_batch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Gather training samples `indices` and apply the random train augmentation.

        `generator` must be a CPU generator: data lives on the CPU and is moved to the device by the caller.
        """
        return self.train_transform(self.train_x[indices], generator), self.train_y[indices]

    def test_batches(
        self, batch_size: int, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield this shard's test samples in order, with the deterministic test transform.

        `shard=(rank, world)` gives a contiguous part; the parts of all ranks cover the set exactly once.
        """
        if batch_size < 1:
            raise ConfigError(f"test batch size must be >= 1, got {batch_size}")
        start, stop = shard_bounds(self.num_test, shard)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield self.test_transform(self.test_x[lo:hi]), self.test_y[lo:hi]
