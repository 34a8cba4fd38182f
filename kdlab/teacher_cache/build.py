"""Building a cache entry: one pass of the frozen teacher over every training sample, or every stored view.

What is computed is fixed by the plan (kdlab.teacher_cache.plan): the logits' storage, the layers
whose features fit the budget, and for augmented data the views (`ViewPlan`). The views are drawn
here, once, from their own seed, and stored with the outputs, so every later run replays these very
parameters; each view's image is made by the same code that makes it for the student
(ReplayedViews.make). Tables are written to disk as they fill (kdlab.teacher_cache.tables), so an
entry larger than memory can be built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdlab.data.datasets import collate
from kdlab.data.replay import ReplayedViews, ReplayPipeline, draw_views
from kdlab.taps import Outputs
from kdlab.teacher_cache.tables import FEATURE_PREFIX, TableWriter, encode_logits, logit_tables


@dataclass
class ViewPlan:
    """The stored views of an augmented training split.

    `kind` "all": every one of the pipeline's `count` finite views, shared by all samples and drawn
    from at random each epoch (`spread` "random"); "drawn": `count` views per sample drawn from
    `seed`, served in turn (`spread` "cycle").
    """

    pipeline: ReplayPipeline
    count: int
    kind: str
    seed: int = 0

    @property
    def spread(self) -> str:
        return "random" if self.kind == "all" else "cycle"

    def spec(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline.spec(), "count": self.count, "kind": self.kind, "seed": self.seed}

    def params(self, images: Any) -> Tensor:
        """The views as parameters: [count, width] for "all", [N, count, width] for "drawn"."""
        if self.kind == "all":
            return self.pipeline.choices(images[0])
        return draw_views(self.pipeline, images, self.count, self.seed)


@dataclass
class EntryLayout:
    """What an entry stores: logits as `codec` (top-`k`), these layers' features, and the views."""

    classes: int
    codec: str = "fp16"
    k: int | None = None
    positions: tuple[int, ...] = ()  # a sample's dims before the classes: a language model's (T,)
    feats: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layer -> shape of one sample's
    views: ViewPlan | None = None

    def bytes_per_view(self, with_feats: bool = True) -> int:
        """Bytes one sample's outputs take in one view."""
        total = 0
        for shape, dtype in logit_tables(self.codec, self.classes, self.k, self.positions).values():
            total += _count(shape) * dtype.itemsize
        if with_feats:
            total += sum(_count(shape) * 2 for shape in self.feats.values())
        return total


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


class _OneView(Dataset):
    """View `view` of every sample of a ReplayedViews, a batch at a time, for the teacher's pass."""

    def __init__(self, views: ReplayedViews, view: int):
        self.views, self.view = views, view

    def __len__(self) -> int:
        return len(self.views)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return {"index": index, "input": self.views.make(index, torch.full_like(index, self.view))}


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    # In index order, and with a private generator: building must not move the run's global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def build_entry(
    entry: Path,
    layout: EntryLayout,
    forward: Callable[[Tensor], Outputs],
    datamodule: Any,
    device: torch.device,
    batch_size: int,
) -> None:
    """Compute and write the entry `layout` describes; its marker is written last."""
    writer = TableWriter(entry)
    split = datamodule.train_set.dataset  # the whole training split, train and validation parts
    total = len(split)
    if layout.views is None:
        passes: list[tuple[int | None, Dataset]] = [(None, split)]
        lead: tuple[int, ...] = (total,)
    else:
        params = layout.views.params(datamodule.replay_images())
        writer.create("views", tuple(params.shape), torch.int32).copy_(params)
        replayed = datamodule.stored_views(
            layout.views.pipeline, params, layout.views.spread, layout.views.seed
        )
        passes = [(k, _OneView(replayed, k)) for k in range(layout.views.count)]
        lead = (layout.views.count, total)
    tables = {
        name: writer.create(name, (*lead, *shape), dtype)
        for name, (shape, dtype) in logit_tables(
            layout.codec, layout.classes, layout.k, layout.positions
        ).items()
    }
    for layer, shape in layout.feats.items():
        tables[FEATURE_PREFIX + layer] = writer.create(FEATURE_PREFIX + layer, (*lead, *shape), torch.float16)

    described = "" if layout.views is None else f" on {layout.views.count} stored views"
    progress = tqdm(total=total * len(passes), desc=f"Caching teacher outputs{described}", unit="sample")
    for view, dataset in passes:
        for index, out in _outputs(forward, dataset, device, batch_size, datamodule.num_workers):
            rows: Any = index if view is None else (view, index)
            for name, value in encode_logits(out.logits, layout.codec, layout.k).items():
                tables[name][rows] = value.cpu()
            for layer in layout.feats:
                tables[FEATURE_PREFIX + layer][rows] = out.feats[layer].half().cpu()
            progress.update(len(index))
    progress.close()
    meta = {
        "samples": total,
        "classes": layout.classes,
        "positions": list(layout.positions),
        "codec": layout.codec,
        "k": layout.k,
        "layers": list(layout.feats),
        "views": None if layout.views is None else layout.views.spec(),
    }
    writer.finish(meta)


def _outputs(
    forward: Callable[[Tensor], Outputs],
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    workers: int,
) -> Iterator[tuple[Tensor, Outputs]]:
    for batch in _loader(dataset, batch_size, workers):
        yield batch["index"], forward(batch["input"].to(device, non_blocking=True))
