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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
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
# How ReplayedViews picks a sample's view each epoch (see there).
SPREADS = ("cycle", "random")
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

    def draw_many(self, image: Tensor, count: int, generator: torch.Generator) -> Tensor | None:
        """`count` views' parameters at once ([count, width]) for images shaped like `image`, from the
        same distribution as `draw`; None when the step can only draw one at a time."""
        return None

    def apply_batch(self, images: Tensor, params: Tensor) -> Tensor:
        """`apply` on each image of a batch [B, C, H, W] with its own row of `params` [B, width]."""
        views = [self.apply(image, row.tolist()) for image, row in zip(images, params, strict=True)]
        return torch.stack(views)


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

    def _positions(self, image: Tensor) -> tuple[int, int]:
        """How many tops and lefts the crop can take on an image shaped like `image`."""
        template = self._template(image)
        pad = template["padding"] if template["needs_pad"] else [0, 0, 0, 0]  # left, top, right, bottom
        height = image.shape[-2] + pad[1] + pad[3]
        width = image.shape[-1] + pad[0] + pad[2]
        return height - template["height"] + 1, width - template["width"] + 1

    def choices(self, image: Tensor) -> list[list[int]] | None:
        tops, lefts = self._positions(image)
        if tops * lefts > MAX_CHOICES:
            return None
        return [[top, left] for top in range(tops) for left in range(lefts)]

    def draw_many(self, image: Tensor, count: int, generator: torch.Generator) -> Tensor:
        # make_params draws top and left uniformly over the positions; so do these.
        tops, lefts = self._positions(image)
        top = torch.randint(0, tops, (count,), generator=generator)
        left = torch.randint(0, lefts, (count,), generator=generator)
        return torch.stack([top, left], dim=1).int()

    def apply_batch(self, images: Tensor, params: Tensor) -> Tensor:
        # The transform's own padding on the whole batch (it is the same for every image), then
        # each image's window by index: the slice F.crop takes when the window lies inside.
        template = self._template(images[0])
        if template["needs_pad"]:
            images = self.transform.transform(images, {**template, "needs_crop": False})
        if not template["needs_crop"]:
            return images
        rows = params[:, 0, None].long() + torch.arange(template["height"])
        cols = params[:, 1, None].long() + torch.arange(template["width"])
        batch = torch.arange(len(images))[:, None, None]
        return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


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

    def draw_many(self, image: Tensor, count: int, generator: torch.Generator) -> Tensor:
        return (torch.rand(count, 1, generator=generator) < self.transform.p).int()

    def apply_batch(self, images: Tensor, params: Tensor) -> Tensor:
        flipped = self.transform.transform(images, {})
        return torch.where(params[:, 0].bool()[:, None, None, None], flipped, images)


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

    def apply_batch(self, images: Tensor, params: Tensor) -> Tensor:
        """The views `params` ([B, width]) of a batch of same-sized images [B, C, H, W], each its own.

        Equal, bit for bit, to `apply` on each image: deterministic steps act alike on every image of
        a batch, and each random step replays each image's own parameters (`ReplayStep.apply_batch`).
        """
        offset = 0
        for transform, step in zip(self.transforms, self.steps, strict=True):
            if step is None:
                images = transform(images)
                continue
            images = step.apply_batch(images, params[:, offset : offset + step.width])
            offset += step.width
        return images

    def draw_many(self, image: Tensor, count: int, generator: torch.Generator) -> Tensor | None:
        """`count` views' parameters ([count, width]) for images shaped like `image`, drawn a step at a
        time for all of them at once; None when a step can only draw one view at a time."""
        columns = []
        for transform, step in zip(self.transforms, self.steps, strict=True):
            if step is None:
                image = transform(image)
                continue
            drawn = step.draw_many(image, count, generator)
            if drawn is None:
                return None
            columns.append(drawn)
            image = step.apply(image, drawn[0].tolist())  # the size the next step sees
        if not columns:
            return torch.zeros(count, 0, dtype=torch.int32)
        return torch.cat(columns, dim=1).int()

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


def draw_views(
    pipeline: ReplayPipeline, images: Tensor | Sequence[Tensor], count: int, seed: int = 0
) -> Tensor:
    """`count` views of every image, as parameters: int32 [N, count, width].

    `images` is a uint8 tensor [N, C, H, W] (one size: the views are drawn for all at once) or a
    dataset of (image tensor, target) pairs (drawn one image at a time, for its own size).
    The draw depends only on `seed` and the images' sizes (not on the run's seed), so every run of
    a sweep replays the same views and can share the teacher's outputs for them. Where the pipeline
    has a small finite set of views and `count` covers it, use `pipeline.choices` instead.
    """
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(images, Tensor):
        drawn = pipeline.draw_many(images[0], len(images) * count, generator)
        if drawn is not None:
            return drawn.reshape(len(images), count, pipeline.width)
    rows = torch.empty(len(images), count, pipeline.width, dtype=torch.int32)
    for i in range(len(images)):
        image = images[i]
        for k in range(count):
            rows[i, k] = pipeline.draw(image, generator)
    return rows


class DecodedImages:
    """The images of a dataset of (image, target) pairs as tensors, decoded one at a time on demand."""

    def __init__(self, samples: Dataset, decode: Callable[[Any], Tensor]):
        self.samples, self.decode = samples, decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tensor:
        return self.decode(self.samples[index][0])


class ReplayedViews(Dataset):
    """Training samples as stored views: in each epoch, each sample is one of its K stored views.

    `params` holds each sample's K views ([N, K, width]) or K views shared by every sample
    ([K, width]: all of a pipeline's finite views). Which view sample i gets in epoch e (`spread`):
    - "cycle": view (e + i) mod K, so a run of K epochs shows each sample each of its views once,
      and the views cycle when a run has more epochs than K;
    - "random": a uniform draw from the K views, seeded by (`seed`, e): with all of a finite
      pipeline's views stored, this is the distribution live augmentation draws from.
    Neither depends on the run's seed: runs of a sweep see the same view of a sample in an epoch.

    `images` is a uint8 tensor [N, C, H, W] (in memory: a batch is made at once, `__getitems__`)
    or a sequence of image tensors (DecodedImages). Items are {"input", "target", "index", "view"}:
    the view's image after `tail` (the dataset's float/normalise steps), and which view it is, so the
    teacher's stored outputs for exactly that image can be looked up; `make` is the one place where
    a view's input is made, for the student and for the teacher's stored outputs alike.
    `extra_views` are other named transforms drawn live from the image (`input_<name>`, as
    IndexedDataset has them). The epoch lives in shared memory, so loader workers see `set_epoch`.
    """

    def __init__(
        self,
        images: Tensor | Sequence[Tensor],
        targets: Tensor,
        pipeline: ReplayPipeline,
        params: Tensor,
        tail: Callable[[Tensor], Tensor],
        spread: str = "cycle",
        seed: int = 0,
        extra_views: Mapping[str, Callable] | None = None,
    ):
        if params.ndim not in (2, 3) or params.shape[-1] != pipeline.width:
            raise ValueError(
                f"params must be [N, K, {pipeline.width}] or [K, {pipeline.width}], got {tuple(params.shape)}"
            )
        if params.ndim == 3 and len(params) != len(targets):
            raise ValueError(f"{len(params)} rows of views for {len(targets)} samples")
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.int64)
        self.pipeline, self.params, self.tail = pipeline, params, tail
        self.spread, self.seed = spread, int(seed)
        self.extra_views = dict(extra_views or {})
        self.views = params.shape[-2]
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._drawn: tuple[int, Tensor] | None = None  # ("random") this process's view table for an epoch

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def views_of(self, index: Tensor) -> Tensor:
        """The view each sample of `index` (int64) gets in the current epoch."""
        epoch = int(self.epoch)
        if self.spread == "cycle":
            return (index + epoch) % self.views
        if self._drawn is None or self._drawn[0] != epoch:
            state = np.random.SeedSequence([self.seed, epoch, 2]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            self._drawn = (epoch, torch.randint(0, self.views, (len(self),), generator=generator))
        return self._drawn[1][index]

    def _rows(self, index: Tensor, views: Tensor) -> Tensor:
        return self.params[index, views] if self.params.ndim == 3 else self.params[views]

    def make(self, index: Tensor, views: Tensor) -> Tensor:
        """The inputs [B, C, H, W] of samples `index` (int64 [B]) in views `views` (int64 [B])."""
        rows = self._rows(index, views)
        if isinstance(self.images, Tensor):
            return self.tail(self.pipeline.apply_batch(self.images[index], rows))
        made = [self.pipeline.apply(self.images[int(i)], row) for i, row in zip(index, rows, strict=True)]
        return torch.stack([self.tail(image) for image in made])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[0] for key, value in self._batch([int(index)]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self._batch(indices)

    def _batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        views = self.views_of(index)
        batch = {"input": self.make(index, views), "target": self.targets[index], "index": index}
        batch["view"] = views
        for name, transform in self.extra_views.items():
            batch[f"input_{name}"] = torch.stack([transform(self.images[int(i)]) for i in index])
        return batch
