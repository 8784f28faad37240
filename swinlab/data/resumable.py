"""A training loader that resumes mid-epoch at the next unseen batch, in the same order.

Lightning restores its loop counters from a checkpoint but restarts a plain DataLoader from the start of a new
random order, so a resumed run trains on other batches than an uninterrupted one. Here the order of every epoch
is a fixed function of ``(seed, epoch)`` (``DistributedSampler``, one replica outside DDP), and the loader is
*stateful*: Lightning saves ``state_dict()`` in every checkpoint and hands it back on resume.
``swinlab.callbacks.ResumePosition`` counts the batches trained on and applies the state before the first batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from swinlab.data.bad_samples import SkipCountingLoader


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order = f(seed, epoch), this rank's share) that can start an epoch at an offset.

    Outside DDP it is one replica of rank 0, i.e. a seeded shuffle of the whole data set. Being a
    ``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            # Lightning's own distributed sampler uses the seed of ``seed_everything``, too.
            seed=int(os.getenv("PL_GLOBAL_SEED", 0)) if seed is None else seed,
        )
        self.resume_epoch = -1
        self.resume_offset = 0

    def resume(self, epoch: int, offset: int) -> None:
        """Start epoch ``epoch`` at its ``offset``-th index (this rank's share); later epochs start at 0."""
        self.set_epoch(epoch)
        self.resume_epoch, self.resume_offset = epoch, offset

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_offset :]
        return iter(indices)


class ResumableDataLoader(SkipCountingLoader):
    """A training ``DataLoader`` on a ``ResumableSampler`` whose position Lightning checkpoints (and which counts
    skipped samples, see ``SkipCountingLoader``).

    ``batches_consumed`` (batches of the current epoch already trained on) is kept up to date by
    ``swinlab.callbacks.ResumePosition``, which also applies the restored position when the run starts.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int | None = None, **kwargs: Any) -> None:
        kwargs.pop("shuffle", None)
        # Lightning rebuilds a loader with its own sampler for ``overfit_batches``; that one has no position to keep.
        sampler = kwargs.pop("sampler", None) or ResumableSampler(dataset, True, seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_consumed = 0

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"epoch": self.sampler.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, ResumableSampler):
            return
        batches = state["batches_consumed"]
        self.sampler.resume(state["epoch"], batches * self.batch_size)
        self.batches_consumed = batches
