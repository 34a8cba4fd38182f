"""Datasets whose items carry their own index, the batch format all of kdlab uses.

Items are dicts {"input", "target", "index"}. `index` is the position in the wrapped
split, so a `Subset` of this wrapper (the train/val halves of a split) still reports the
index into the full training set, which per-sample state (CRD's bank, the teacher-output
cache) keys on.

`TensorBatchDataset` is the fast path for data held in memory as one uint8 tensor with a
deterministic transform: the DataLoader fetches a whole batch with one tensor index
(`__getitems__`) and transforms it at once, instead of running the transform per sample
and collating. At the student's step rate once the teacher is cached (thousands of small
images a second on a CPU) the per-sample path would be a large part of every step. A DataLoader
of one's own over these datasets needs `collate_fn=collate` (below), as kdlab's loaders use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate


class IndexedDataset(Dataset):
    """Wrap a dataset of (image, target) pairs; `targets` holds every sample's label as int64.

    `views` are extra named transforms of the same image: each item then also carries
    `input_<name>` (e.g. `input_strong`), drawn independently of `input`.
    """

    def __init__(
        self,
        base: Dataset,
        targets: torch.Tensor,
        transform: Callable | None = None,
        views: Mapping[str, Callable] | None = None,
    ):
        if len(targets) != len(base):
            raise ValueError(f"{len(targets)} targets for {len(base)} samples")
        self.base = base
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.transform = transform
        self.views = dict(views or {})

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw, _ = self.base[index]
        image = self.transform(raw) if self.transform is not None else raw
        # Plain ints collate to int64 tensors, which is the dtype the contract promises.
        item = {"input": image, "target": int(self.targets[index]), "index": int(index)}
        for name, view in self.views.items():
            item[view_key(name)] = view(raw)
        return item


class TensorBatchDataset(IndexedDataset):
    """Images in one [N,C,H,W] tensor and a transform that draws nothing at random.

    The transform is applied to whole batches ([B,C,H,W]); torchvision's v2 transforms treat the
    leading axis as a batch, which gives the same result as per sample only because nothing in
    it is random (a random crop would crop every image of the batch alike). Callers check that.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None):
        super().__init__(torch.utils.data.TensorDataset(images, targets), targets, transform)
        self.images = images

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index]
        if self.transform is not None:
            images = self.transform(images)
        return {"input": images, "target": self.targets[index], "index": index}


def view_key(name: str) -> str:
    """The batch key of the extra view `name`: "input_strong" for "strong"."""
    return f"input_{name}"


def collate(batch: Any) -> Any:
    """Batches from `__getitems__` arrive collated already; lists of items are collated as usual."""
    return batch if isinstance(batch, Mapping) else default_collate(batch)
