"""The callback that serves an offline scheme's frozen teacher from its cache entry.

At `on_fit_start` the scheme is on its device and the data is set up, on every rank. The entry is
read, or built first by one process while the others (DDP ranks, sweep jobs) wait on its lock; for
augmented data the training split is then served as the entry's stored views, and every training
epoch starts by telling those views which epoch it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from kdlab.data.replay import ReplayedViews
from kdlab.errors import KdlabError
from kdlab.store import build_once
from kdlab.teacher_cache.build import EntryLayout, build_entry
from kdlab.teacher_cache.plan import plan
from kdlab.teacher_cache.tables import MARKER, TeacherOutputs, read_entry

log = logging.getLogger(__name__)


def load_or_build(
    entry: Path, layout: EntryLayout, forward: Any, datamodule: Any, device: Any, batch_size: int
) -> tuple[TeacherOutputs, ReplayedViews | None]:
    """The entry's outputs (and, for augmented data, its stored views as a training dataset)."""
    build_once(
        entry,
        MARKER,
        lambda folder: build_entry(folder, layout, forward, datamodule, device, batch_size),
        "computing the teacher's outputs for the cache",
    )
    meta, tables = read_entry(entry)
    samples = datamodule.train_split_size
    if meta["samples"] != samples:
        raise KdlabError(
            f"The cached teacher outputs in {entry} hold {meta['samples']} samples, but the training split "
            f"has {samples}. The entry is damaged: delete {entry} and rerun to rebuild it."
        )
    views = None
    if layout.views is not None:
        spec = layout.views
        views = datamodule.stored_views(spec.pipeline, tables["views"], spec.spread, spec.seed)
    outputs = TeacherOutputs(tables, meta["codec"], meta["classes"], None if views is None else views.views)
    return outputs, views


def cache_callback(
    cfg: DictConfig, scheme: Any, datamodule: Any, weights: str, architecture: DictConfig
) -> TeacherCache | None:
    """The callback that serves `scheme`'s frozen teacher from the cache, or None when it cannot."""
    cache = plan(cfg, architecture, datamodule, weights, scheme.teacher_tap)
    if not cache.usable:
        return None
    return TeacherCache(cache.entry, cache.layout, cache.live_layers, cfg.teacher_cache.device_bytes)


class TeacherCache(L.Callback):
    """Hands the entry's outputs to the scheme (`use_teacher_outputs`) when fitting starts.

    On a GPU the tables are kept in device memory when they fit in `device_bytes`, else read from
    the memory-mapped files in host memory.
    """

    def __init__(
        self, entry: Path, layout: EntryLayout, live_layers: tuple[str, ...] = (), device_bytes: float = 2e9
    ):
        self.entry = Path(entry)
        self.layout = layout
        self.live_layers = tuple(live_layers)
        self.device_bytes = float(device_bytes)
        self.views: ReplayedViews | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        outputs, self.views = load_or_build(
            self.entry,
            self.layout,
            pl_module.teacher_forward,
            datamodule,
            pl_module.device,
            datamodule.batch_size,
        )
        outputs.live_layers = self.live_layers
        if pl_module.device.type != "cpu" and outputs.nbytes <= self.device_bytes:
            outputs = outputs.to(pl_module.device)
        if self.views is not None:
            datamodule.serve_stored_views(self.views)
        # Validation batches are served too when they are transformed as training batches are, and are
        # samples of the training split (image data's validation part; held-out text is not).
        same = self.views is None and repr(datamodule.train_transform) == repr(datamodule.eval_transform)
        same = same and getattr(datamodule, "validation_from_training_split", True)
        pl_module.use_teacher_outputs(outputs, covers_validation=same)
        stored = "logits" if not outputs.layers else "logits and features " + ", ".join(outputs.layers)
        where = (
            f"{stored} of {self.views.views} stored views per sample" if self.views is not None else stored
        )
        live = f"; features {', '.join(self.live_layers)} live" if self.live_layers else ""
        log.info(
            "Teacher %s served from the cache %s (%.1f MB)%s", where, self.entry, outputs.nbytes / 1e6, live
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under DDP the sampler Lightning puts in place does not pass the epoch on to the dataset.
        if self.views is not None:
            self.views.set_epoch(trainer.current_epoch)
