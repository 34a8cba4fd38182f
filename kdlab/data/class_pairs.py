"""Training batches made of same-class pairs, for class-wise self-distillation (`mode=cskd`).

CS-KD (Yun et al. 2020) compares the model's prediction for a sample with its prediction for
another sample of the same class, so every batch holds `batch_size` samples in a shuffled order
followed, in the same order, by one partner of each. A scheme asks the datamodule for these batches
with `datamodule.use_batch_sampler(class_pair_batches)` (kdlab.data.base).

The order of the first halves is the usual (seed, epoch) shuffle (EpochShuffle), so every position of
the split is a first half exactly once per epoch; the partners are a function of (seed, epoch) too,
so a resumed run draws the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler, Subset

from kdlab.data.base import EpochShuffle
from kdlab.errors import KdlabError

# The trailing word of the partners' seed: EpochShuffle's order uses 1, EpochSeed (kdlab.resume) none.
PARTNER_STREAM = 2


class ClassPairBatches(BatchSampler):
    """Batches of dataset positions: `batch_size` positions from `sampler`, then a partner of each.

    The partner of a position is another position of the same class, drawn uniformly (the position
    itself only when its class has no other sample in the split). Each epoch draws one partner for
    every position of the dataset from a generator seeded with (seed, epoch), so a partner does not
    depend on which batch, or under DDP which process, its sample falls in.

    A BatchSampler with `sampler`, `batch_size` and `drop_last`, so that Lightning can put its
    DistributedSampler in place of `sampler` under DDP (it re-creates the batch sampler with the
    other arguments unchanged). Lightning calls `set_epoch` on `sampler` each epoch, not on the batch
    sampler, so the epoch is read from there.

    Args:
        sampler: the order of the first halves (EpochShuffle; Lightning's DistributedSampler under DDP).
        batch_size: samples in each half (the authors' `--batch-size`): a batch holds twice as many.
        drop_last: drop a last, smaller batch.
        targets: the class of each position of the dataset `sampler` draws from (int64).
        seed: the run's seed.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sized,
        batch_size: int,
        drop_last: bool = False,
        targets: Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__(sampler, batch_size, drop_last)
        if targets is None:
            raise KdlabError(
                "ClassPairBatches needs the class of every sample (targets=) to draw same-class partners. "
                "Build it with kdlab.data.class_pairs.class_pair_batches(dataset, seed, epoch, batch_size)."
            )
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.seed = int(seed)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the first halves' order, and so the partners' (Lightning sets the sampler's)."""
        self.sampler.set_epoch(epoch)

    def partners(self, epoch: int) -> Tensor:
        """One partner position for every position of the dataset, drawn for `epoch` (see the class)."""
        targets = self.targets
        n = len(targets)
        seed = np.random.SeedSequence([self.seed, int(epoch), PARTNER_STREAM]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        # Positions grouped by class; each position's class block is [start, start + count) of `grouped`.
        grouped = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets)
        starts = torch.cumsum(counts, 0) - counts
        start, count = starts[targets], counts[targets]
        rank = torch.empty(n, dtype=torch.int64)  # each position's place within its class block
        rank[grouped] = torch.arange(n) - starts[targets[grouped]]
        # Uniform over the other count - 1 members: draw in [0, count - 1), then step over the sample itself.
        others = (count - 1).clamp_min(1)
        draw = (torch.rand(n, generator=generator, dtype=torch.float64) * others).long().clamp_max(others - 1)
        offset = torch.where(count > 1, draw + (draw >= rank).long(), rank)
        return grouped[start + offset]

    def __iter__(self) -> Iterator[list[int]]:
        partner = self.partners(self.epoch).tolist()
        for batch in super().__iter__():
            yield batch + [partner[i] for i in batch]


def split_targets(dataset: Dataset) -> Tensor:
    """The class of each position of `dataset`: an IndexedDataset's `targets`, through any Subsets."""
    if isinstance(dataset, Subset):
        return split_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise KdlabError(
            f"Same-class pairs (mode=cskd) need the label of every training sample, but the training set "
            f"({type(dataset).__name__}) has no `targets`. Use a kdlab datamodule, whose splits are "
            "Subsets of an IndexedDataset with its targets."
        )
    return torch.as_tensor(targets, dtype=torch.int64)


def class_pair_batches(dataset: Dataset, seed: int, epoch: int, batch_size: int) -> ClassPairBatches:
    """The factory for `datamodule.use_batch_sampler`: same-class pairs over `dataset` from `epoch` on."""
    return ClassPairBatches(
        EpochShuffle(dataset, seed, epoch),
        batch_size,
        drop_last=False,
        targets=split_targets(dataset),
        seed=seed,
    )
