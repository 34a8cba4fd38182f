"""A dataset wrapper whose items carry their own index, the batch format all of kdlab uses.

Items are dicts {"input", "target", "index"}. `index` is the position in the wrapped
split, so a `Subset` of this wrapper (the train/val halves of a split) still reports the
index into the full training set, which per-sample caches (e.g. stored teacher logits)
key on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a dataset of (image, target) pairs; `targets` holds every sample's label as int64."""

    def __init__(self, base: Dataset, targets: torch.Tensor, transform: Callable | None = None):
        if len(targets) != len(base):
            raise ValueError(f"{len(targets)} targets for {len(base)} samples")
        self.base = base
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = self.base[index]
        if self.transform is not None:
            image = self.transform(image)
        # Plain ints collate to int64 tensors, which is the dtype the contract promises.
        return {"input": image, "target": int(self.targets[index]), "index": int(index)}
