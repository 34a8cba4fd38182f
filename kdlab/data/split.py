"""Carve a seeded, reproducible validation set out of a training split.

The official test split stays untouched for final numbers; model selection happens on
this held-out part of the training set instead.
"""

from __future__ import annotations

import torch

from kdlab.errors import KdlabError


def resolve_val_count(val_size: int | float, n_train: int) -> int:
    """Turn `val_size` (a count, or a fraction of `n_train`) into a count.

    Both the validation and the remaining training part must keep at least one sample.
    """
    # bool is an int subclass; `val_size: true` is surely a mistake, not a count of 1.
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        count = None
    elif isinstance(val_size, float):
        count = round(val_size * n_train) if 0.0 < val_size < 1.0 else None
    else:
        count = val_size
    if count is None or not 0 < count < n_train:
        raise KdlabError(
            f"data.val_size={val_size!r} does not fit a training split of {n_train} samples. Set "
            f"data.val_size to a count between 1 and {n_train - 1}, or to a fraction between 0 and 1 "
            f"(e.g. 0.1), so both the train and the validation part keep at least one sample."
        )
    return count


def split_indices(n_train: int, val_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, val) index tensors: a disjoint, sorted partition of range(n_train) fixed by `seed`."""
    # A private generator keeps the split independent of the global RNG state and of other code.
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return order[val_count:].sort().values, order[:val_count].sort().values
