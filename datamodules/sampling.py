"""Training-data order that survives interruption: a fresh shuffle per epoch from (seed, epoch), sharded
across processes without overlap, and a loader that resumes mid-epoch where it stopped.

Lightning restarts a mid-epoch data loader from the epoch's start unless the loader is stateful. The
loader here counts the batches it has handed out in the current epoch (Lightning takes batches from a
sized loader one at a time, without prefetching), saves that count in the checkpoint, and after a
resume skips exactly that many batches of the same epoch's order.

The sampler derives from ``DistributedSampler`` so that Lightning never wraps or replaces it: it does
the sharding itself. Every sample is seen exactly once per epoch: when the samples do not divide
evenly, the shorter shards are filled with padding rows (index ``len(dataset)``, which the dataset
serves with every label masked), so all processes run the same number of batches and nothing is
counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _process_group() -> tuple[int, int]:
    """(number of processes, this process's rank), or (1, 0) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def unrepeated_sampler(dataset) -> DistributedSampler | None:
    """In a process group, a sampler that gives each process its own share of ``dataset``, in order, none
    twice (shares may differ by one); outside one, None (the loader's own order)."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    world, _ = _process_group()
    return UnrepeatedDistributedSampler(dataset, shuffle=False) if world > 1 else None


class EpochShuffleSampler(DistributedSampler):
    """Shuffle ``num_samples`` indices per epoch from ``(seed, epoch)``; this process takes every ``world``-th.

    Args:
        num_samples: Rows of the dataset.
        seed: Base seed of the shuffle (the same on every process).
        shuffle: Shuffle (True) or keep the dataset's order.
        num_replicas: Processes sharing the data; unset reads the process group.
        rank: This process's rank; unset reads the process group.
        batch_size: Each process's share is padded to a multiple of this (1: only to even out the shares), so
            that with the training batch size every batch is full and has the same shape.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank=None,
        batch_size: int = 1,
    ) -> None:
        world, this_rank = _process_group()
        self.num_replicas = world if num_replicas is None else num_replicas
        self.rank = this_rank if rank is None else rank
        self.dataset_len = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.drop_last = False
        per_process = -(-num_samples // self.num_replicas)
        self.num_samples = -(-per_process // batch_size) * batch_size  # per process, padding included
        self.total_size = self.num_samples * self.num_replicas
        self.skip = 0  # indices of the current epoch already consumed before a resume

    @property
    def padding_index(self) -> int:
        """The index that stands for a padding row (every label masked)."""
        return self.dataset_len

    def epoch_order(self) -> list[int]:
        """All indices of the current epoch, in order, padded to fill every process's share."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        return order + [self.padding_index] * (self.total_size - self.dataset_len)

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an ``EpochShuffleSampler`` whose position in the epoch is saved and restored.

    Args:
        dataset: A map-style dataset that serves ``sampler.padding_index`` as a fully masked row.
        batch_size: Rows per batch.
        sampler: The epoch sampler.
        **kwargs: Other ``DataLoader`` arguments (workers, collate function).
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        # its own generator, so creating the iterator never draws from the global RNG (exact resume)
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_yielded = 0
        self._resume_batches = 0

    def __iter__(self):
        sampler: EpochShuffleSampler = self.sampler
        start, self._resume_batches = self._resume_batches, 0
        sampler.skip = start * self.batch_size
        self.batches_yielded = start
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_yielded": int(self.batches_yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._resume_batches = int(state["batches_yielded"])
