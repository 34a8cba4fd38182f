"""Augmentation that can be drawn once, stored as parameters, and replayed exactly.

The teacher-output cache serves augmented training only if the student sees the very image the
teacher saw when its outputs were stored. FKD (Shen & Xing, ECCV 2022) stores each view's
augmentation parameters with the teacher's soft labels and replays them; this module is that
replay. A `ReplayPipeline` wraps a training augmentation list whose random steps each have a
`ReplayStep`:

- `draw(image, generator)` draws one view's parameters (a few integers) with the transform's own
  sampling code (torchvision's `make_params`), seeded from `generator`, so the views follow the
  same distribution as live augmentation, and the draw depends on nothing else (not the run's seed);
- `apply(image, params)` produces that view with the transform's own `transform(image, params)`, so
  a replayed view is bit-identical to the image the transform made when it drew those parameters;
- `choices(image)` lists every possible view when there are few of them (RandomCrop with padding p:
  (2p+1)^2 positions; a flip: 2), so a cache can store them all.

`draw_views` draws K views per sample from a seed of its own, and `ReplayedViews` is the training
dataset that serves them: view (epoch + index) mod K of each sample, with the view's number in the
batch so that the teacher's outputs for exactly that image can be found.

RandomCrop, RandomResizedCrop and the horizontal and vertical flips have steps; transforms that
draw nothing (Resize, CenterCrop, Pad, ...) pass through. Anything else is refused by name
(`unreplayable`): another transform joins by adding a ReplayStep and listing it in `STEPS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from kdlab.errors import KdlabError

# Transforms that draw nothing: a replayed pipeline applies them as they are.
DETERMINISTIC = (
    v2.Resize,
    v2.CenterCrop,
    v2.Pad,
    v2.Grayscale,
    v2.Identity,
    v2.ToImage,
    v2.ToDtype,
    v2.ToPureTensor,
    v2.Normalize,
)
# At most this many views are listed by `choices` (a 28x28 RandomCrop with padding 4 and a flip: 162).
MAX_CHOICES = 4096


def _seeded(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _drawn(transform: v2.Transform, image: Tensor, generator: torch.Generator) -> dict[str, Any]:
    """The transform's own `make_params`, on a private RNG stream seeded from `generator`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeded(generator))
        return transform.make_params([image])


class ReplayStep:
    """One random transform, as parameters: `width` integers per view."""

    width: int

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def draw(self, image: Tensor, generator: torch.Generator) -> list[int]:
        raise NotImplementedError

    def apply(self, image: Tensor, params: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def choices(self, image: Tensor) -> list[list[int]] | None:
        """Every possible view's parameters, or None when there are too many (a continuous draw)."""
        return None


class CropStep(ReplayStep):
    """v2.RandomCrop: the crop's (top, left); its size and padding are fixed by the transform."""

    width = 2

    def _template(self, image: Tensor) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            return self.transform.make_params([image])

    def draw(self, image: Tensor, generator: torch.Generator) -> list[int]:
        params = _drawn(self.transform, image, generator)
        return [params["top"], params["left"]]

    def apply(self, image: Tensor, params: Sequence[int]) -> Tensor:
        template = self._template(image)
        template.update(top=int(params[0]), left=int(params[1]))
        return self.transform.transform(image, template)

    def choices(self, image: Tensor) -> list[list[int]] | None:
        template = self._template(image)
        if not template["needs_crop"]:
            return [[0, 0]]
        pad = template["padding"] if template["needs_pad"] else [0, 0, 0, 0]  # left, top, right, bottom
        height = image.shape[-2] + pad[1] + pad[3]
        width = image.shape[-1] + pad[0] + pad[2]
        tops = range(height - template["height"] + 1)
        lefts = range(width - template["width"] + 1)
        if len(tops) * len(lefts) > MAX_CHOICES:
            return None
        return [[top, left] for top in tops for left in lefts]


class ResizedCropStep(ReplayStep):
    """v2.RandomResizedCrop: the box (top, left, height, width) before the resize."""

    width = 4

    def draw(self, image: Tensor, generator: torch.Generator) -> list[int]:
        params = _drawn(self.transform, image, generator)
        return [params["top"], params["left"], params["height"], params["width"]]

    def apply(self, image: Tensor, params: Sequence[int]) -> Tensor:
        top, left, height, width = (int(p) for p in params)
        return self.transform.transform(image, {"top": top, "left": left, "height": height, "width": width})


class FlipStep(ReplayStep):
    """v2.RandomHorizontalFlip / RandomVerticalFlip: whether the flip is applied (1) or not (0)."""

    width = 1

    def draw(self, image: Tensor, generator: torch.Generator) -> list[int]:
        # The transforms' own rule: skip when a uniform draw is >= p.
        return [int(float(torch.rand(1, generator=generator)) < self.transform.p)]

    def apply(self, image: Tensor, params: Sequence[int]) -> Tensor:
        return self.transform.transform(image, {}) if int(params[0]) else image

    def choices(self, image: Tensor) -> list[list[int]] | None:
        p = self.transform.p
        return [[0]] if p <= 0 else [[1]] if p >= 1 else [[0], [1]]


STEPS: dict[type, Callable[[v2.Transform], ReplayStep]] = {
    v2.RandomCrop: CropStep,
    v2.RandomResizedCrop: ResizedCropStep,
    v2.RandomHorizontalFlip: FlipStep,
    v2.RandomVerticalFlip: FlipStep,
}


def unreplayable(transforms: Sequence[Callable]) -> list[str]:
    """The names of the transforms in `transforms` that cannot be stored and replayed."""
    names = []
    for transform in transforms:
        if isinstance(transform, v2.Compose):
            names += unreplayable(transform.transforms)
        elif type(transform) not in STEPS and not isinstance(transform, DETERMINISTIC):
            names.append(type(transform).__name__)
    return names


class ReplayPipeline:
    """An augmentation list whose views are drawn as parameters and replayed exactly.

    A view is one row of `width` integers: each random step's parameters in order. Deterministic
    steps are applied as they are. `spec()` describes the pipeline for cache keys.
    """

    def __init__(self, transforms: Sequence[Callable]):
        refused = unreplayable(transforms)
        if refused:
            raise KdlabError(
                f"The training augmentation {', '.join(refused)} cannot be stored and replayed, so the "
                "teacher-output cache cannot serve augmented batches. Replayable: "
                f"{', '.join(t.__name__ for t in STEPS)} and transforms that draw nothing. Set "
                "teacher_cache.enabled=false (or auto) to run the teacher live, or change "
                "data.train_transforms."
            )
        self.transforms = list(_flatten(transforms))
        self.steps: list[ReplayStep | None] = [
            STEPS[type(t)](t) if type(t) in STEPS else None for t in self.transforms
        ]
        self.width = sum(step.width for step in self.steps if step is not None)

    def spec(self) -> str:
        return repr(self.transforms)

    def _walk(self, image: Tensor, params: Sequence[int] | None, generator: torch.Generator | None):
        """Apply the pipeline to `image`, with `params` (replay) or drawing them from `generator`."""
        drawn: list[int] = []
        offset = 0
        for transform, step in zip(self.transforms, self.steps, strict=True):
            if step is None:
                image = transform(image)
                continue
            if params is None:
                own = step.draw(image, generator)
            else:
                own = [int(p) for p in params[offset : offset + step.width]]
            offset += step.width
            drawn += own
            image = step.apply(image, own)
        return image, drawn

    def draw(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """One view's parameters for `image` (an int32 row of `width`)."""
        return torch.tensor(self._walk(image, None, generator)[1], dtype=torch.int32)

    def apply(self, image: Tensor, params: Sequence[int] | Tensor) -> Tensor:
        """The view `params` of `image`: what the transforms made when they drew those parameters."""
        return self._walk(image, [int(p) for p in params], None)[0]

    def choices(self, image: Tensor) -> Tensor | None:
        """Every view of `image` as rows of parameters, when there are at most MAX_CHOICES; else None.

        Valid for pipelines whose random steps come before anything that changes the image's size,
        or whose sizes are fixed (each step's choices are listed on the image as it reaches it
        unmodified by earlier random steps: crops keep a fixed output size, flips keep the size).
        """
        per_step = []
        for transform, step in zip(self.transforms, self.steps, strict=True):
            if step is None:
                image = transform(image)
                continue
            options = step.choices(image)
            if options is None:
                return None
            per_step.append(options)
            image = step.apply(image, options[0])
        count = 1
        for options in per_step:
            count *= len(options)
        if count > MAX_CHOICES:
            return None
        rows = [sum(combo, []) for combo in itertools.product(*per_step)]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), self.width)


def _flatten(transforms: Sequence[Callable]):
    for transform in transforms:
        if isinstance(transform, v2.Compose):
            yield from _flatten(transform.transforms)
        else:
            yield transform


def draw_views(pipeline: ReplayPipeline, images: Tensor, count: int, seed: int = 0) -> Tensor:
    """`count` views of every image, as parameters: int32 [N, count, width].

    The draw depends only on `seed` and the images' shapes (not on the run's seed), so every run of
    a sweep replays the same views and can share the teacher's outputs for them. Where the pipeline
    has a small finite set of views and `count` covers it, use `pipeline.choices` instead.
    """
    generator = torch.Generator().manual_seed(int(seed))
    rows = torch.empty(len(images), count, pipeline.width, dtype=torch.int32)
    for i, image in enumerate(images):
        for k in range(count):
            rows[i, k] = pipeline.draw(image, generator)
    return rows


class ReplayedViews(Dataset):
    """Training samples as stored views: in epoch e, sample i is its view (e + i) mod K.

    `params` holds each sample's K views ([N, K, width]) or K views shared by every sample
    ([K, width], e.g. all of a pipeline's finite views). Items are {"input", "target", "index",
    "view"}: the view's image after `tail` (the dataset's float/normalise steps), and which view it
    is, so the teacher's stored outputs for exactly that image can be looked up. Views cycle when a
    run has more epochs than K; every run, whatever its seed, sees view (e + i) mod K of sample i.
    The epoch lives in shared memory: loader workers see `set_epoch` (called by the sampler).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        pipeline: ReplayPipeline,
        params: Tensor,
        tail: Callable[[Tensor], Tensor],
    ):
        if params.ndim not in (2, 3) or params.shape[-1] != pipeline.width:
            raise ValueError(
                f"params must be [N, K, {pipeline.width}] or [K, {pipeline.width}], got {tuple(params.shape)}"
            )
        if params.ndim == 3 and len(params) != len(images):
            raise ValueError(f"{len(params)} rows of views for {len(images)} images")
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.int64)
        self.pipeline, self.params, self.tail = pipeline, params, tail
        self.views = params.shape[-2]
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def view_of(self, index: int) -> int:
        return (int(self.epoch) + int(index)) % self.views

    def __getitem__(self, index: int) -> dict[str, Any]:
        view = self.view_of(index)
        row = self.params[index, view] if self.params.ndim == 3 else self.params[view]
        image = self.tail(self.pipeline.apply(self.images[index], row))
        return {"input": image, "target": int(self.targets[index]), "index": int(index), "view": view}
