"""Build the train and eval transform pipelines from torchvision.transforms.v2 pieces.

Every pipeline ends the same way, ToDtype(float32, scale=True) then Normalize with the
dataset's mean/std, so train and eval inputs live on the same scale; only the geometry
before it differs (augmentation for train, a fixed resize/crop or nothing for eval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from kdlab.errors import KdlabError


def build_pipeline(
    steps: Sequence[Callable], mean: Sequence[float], std: Sequence[float], decode: bool = False
) -> v2.Compose:
    """Compose `steps` between optional decoding and the shared float/normalise tail.

    `decode` is for datasets that yield PIL images: ToImage first, so user augmentations see
    tensors just as they do for the in-memory datasets, and ToPureTensor last, so batches
    collate to plain tensors.
    """
    head, tail = pipeline_ends(mean, std, decode)
    return v2.Compose([*head, *steps, *tail])


def pipeline_ends(
    mean: Sequence[float], std: Sequence[float], decode: bool = False
) -> tuple[list[Callable], list[Callable]]:
    """The steps every pipeline starts with (decoding) and ends with (float, normalise), apart."""
    head = [v2.ToImage()] if decode else []
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return head, tail + ([v2.ToPureTensor()] if decode else [])


def as_transform_list(
    transforms, default: Sequence[Callable], key: str = "data.train_transforms"
) -> list[Callable]:
    """Return the user's augmentation list (None means `default`), checking each entry is callable.

    Hydra hands over a ListConfig, so anything iterable is accepted.
    """
    if transforms is None:
        return list(default)
    if isinstance(transforms, str | bytes) or not hasattr(transforms, "__iter__"):
        raise KdlabError(
            f"{key} must be a list of transforms, got {transforms!r}. Give a list of "
            f"entries like `- _target_: torchvision.transforms.v2.RandomHorizontalFlip`, [] for no "
            f"augmentation, or null for the dataset's usual augmentation."
        )
    steps = list(transforms)
    for step in steps:
        if not callable(step):
            raise KdlabError(
                f"{key} holds {step!r}, which is not a transform. Each entry needs a "
                f"`_target_` naming a transform class, e.g. `_target_: torchvision.transforms.v2.RandomCrop` "
                f"with its arguments beside it, and must be instantiated (Hydra does this for the config)."
            )
    return steps
