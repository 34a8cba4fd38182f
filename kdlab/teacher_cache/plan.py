"""Deciding whether a run uses the cache, what its entry stores, and which entry it is.

`plan` reads `teacher_cache.*` and the run's data and knowledge:
- **Exactness.** Without augmentation one row per sample is exact. With augmentation the training
  views must be replayable (kdlab.data.replay: RandomCrop, RandomResizedCrop, the flips and
  transforms that draw nothing); any other transform is refused by name.
- **K** (`teacher_cache.views`). `auto`: all of the pipeline's views when it has a small finite set
  of at most the planned number of epochs (e.g. RandomCrop(32, padding=4) + flip: 162), else one
  view per planned epoch, drawn per sample. An integer K: that many per sample, or all of a finite
  set when K covers it. `all`: the finite set. K is capped by the byte budget.
- **Budget** (`teacher_cache.max_bytes`). Logits are always stored (K is lowered until they fit);
  features only when they fit beside them, else the teacher runs live for those layers.
- **Key.** The teacher's weights and architecture, the samples' content, the transform, the views
  (pipeline, K, kind, view seed), the logits' storage and the stored layers. Not the run's seed,
  the knowledge's hyper-parameters or the split: all runs that would read the same numbers share
  one entry.
- **When auto builds** a missing entry: when the teacher passes it saves in this run, times the
  jobs of the Hydra sweep this run belongs to, pay for building it; or when another run (another
  run directory) asked for the same entry before: the second run of a setting builds it, so later
  ones never run the teacher. A run resumed in place is still the first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdlab.data.replay import unreplayable
from kdlab.errors import KdlabError
from kdlab.store import content_key
from kdlab.taps import FeatureTap
from kdlab.tasks import task_of
from kdlab.teacher_cache.build import EntryLayout, ViewPlan
from kdlab.teacher_cache.tables import CODECS, FORMAT, MARKER

log = logging.getLogger(__name__)


@dataclass
class CachePlan:
    """Whether a run can use the cache; if so, its entry, what the entry stores, and what runs live."""

    entry: Path | None
    reason: str | None = None  # why the cache cannot be used; None when it can
    layout: EntryLayout | None = None
    live_layers: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.reason is None


def plan(
    cfg: DictConfig, architecture: DictConfig, datamodule: Any, weights: str, tap: FeatureTap
) -> CachePlan:
    """Decide whether this run may use the cache (`teacher_cache.enabled`), and which entry it reads.

    `architecture` is the teacher's model config and `weights` the sha256 of its weights
    (`kdlab.resume.teacher_identity`); `tap` reads the teacher's features for the run's knowledge.
    """
    options = cfg.teacher_cache
    setting = options.enabled
    if setting not in ("auto", True, False):
        raise KdlabError(
            f"teacher_cache.enabled={setting!r} is not a choice. Set teacher_cache.enabled=auto (cache when "
            "it is exact), true (require it) or false (always run the teacher)."
        )
    if setting is False:
        return CachePlan(None, "teacher_cache.enabled=false")
    codec, k = _codec(options)
    with torch.no_grad():  # one sample gives the per-sample sizes of the logits and features
        example = tap(task_of(datamodule).example_input(1).to(next(tap.model.parameters()).device))
    classes = example.logits.shape[-1]  # after a language model's positions
    if codec == "topk" and k >= classes:
        raise KdlabError(
            f"teacher_cache.topk={k} keeps every one of the teacher's {classes} classes. Set "
            f"teacher_cache.topk below {classes}, or teacher_cache.logits=fp16 to store all logits."
        )
    layout = EntryLayout(classes, codec, k if codec == "topk" else None, tuple(example.logits.shape[1:-1]))
    layout.feats = {name: tuple(value.shape[1:]) for name, value in example.feats.items()}
    reason = _refusal(cfg, datamodule, layout)
    if reason is not None:
        if setting is True:
            raise KdlabError(
                f"teacher_cache.enabled=true, but the teacher's outputs cannot be cached: {reason} Fix that, "
                "or set teacher_cache.enabled=auto to train uncached in that case."
            )
        log.info("Teacher outputs are not cached: %s", reason)
        return CachePlan(None, reason)
    layout.views = _views(cfg, datamodule, layout)
    live = _fit_features(layout, datamodule.train_split_size, float(options.max_bytes))
    spec = _key(architecture, datamodule, weights, layout)
    name = str(architecture.get("name", "teacher")).replace("/", "_")
    entry = Path(options.dir).expanduser() / f"{name}-{content_key(spec)}"
    if setting == "auto" and not (entry / MARKER).exists():
        reason = _not_worth_building(cfg, datamodule, layout, entry)
        if reason is not None:
            log.info("Teacher outputs are not cached: %s", reason)
            return CachePlan(None, reason)
    return CachePlan(entry, layout=layout, live_layers=live)


def _codec(options: DictConfig) -> tuple[str, int]:
    codec, k = options.get("logits", "fp16"), options.get("topk", 5)
    if codec not in CODECS:
        raise KdlabError(
            f"teacher_cache.logits={codec!r} is not a choice. Set teacher_cache.logits=fp16 (every logit in "
            "half precision) or topk (the teacher_cache.topk largest and the tail's mass, as FKD does)."
        )
    if codec == "topk" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise KdlabError(f"teacher_cache.topk={k!r} must be a positive integer, e.g. teacher_cache.topk=5.")
    return codec, k


def _refusal(cfg: DictConfig, datamodule: Any, layout: EntryLayout) -> str | None:
    """Why the cache cannot give exactly the outputs the teacher would, or cannot hold them; else None."""
    random = datamodule.train_transform_is_random
    if random and (refused := unreplayable(datamodule.augmentation)):
        return (
            f"the training augmentation {', '.join(refused)} cannot be stored and replayed, so the "
            "teacher would have to see each new view live; use replayable augmentation (RandomCrop, "
            "RandomResizedCrop, flips) or data.train_transforms=[]."
        )
    one_view = _logits_bytes_per_view(layout, datamodule)
    budget = float(cfg.teacher_cache.max_bytes)
    if one_view > budget:
        return _over_budget(one_view, budget, "one view of the logits" if random else "the logits")
    return None


def _logits_bytes_per_view(layout: EntryLayout, datamodule: Any) -> int:
    """The bytes one view of the whole training split's logits takes (the budget's unit)."""
    return layout.bytes_per_view(with_feats=False) * datamodule.train_split_size


def _over_budget(needed: float, budget: float, what: str) -> str:
    return (
        f"{what} need {needed / 1e9:.2f} GB, over teacher_cache.max_bytes={budget:.3g}; raise it, or store "
        "top-k logits (teacher_cache.logits=topk)."
    )


def _views(cfg: DictConfig, datamodule: Any, layout: EntryLayout) -> ViewPlan | None:
    """The views to store (see the module docstring), as many as fit the byte budget; None without
    augmentation."""
    if not datamodule.train_transform_is_random:
        return None
    pipeline = datamodule.replay_pipeline()
    wanted = _wanted_views(cfg, datamodule, pipeline)
    budget = float(cfg.teacher_cache.max_bytes)
    fitting = int(budget // _logits_bytes_per_view(layout, datamodule))
    if wanted.count <= fitting:
        return wanted
    log.info(
        "Teacher outputs: %d views would exceed teacher_cache.max_bytes=%.3g; storing %d per sample "
        "(they cycle over the epochs).",
        wanted.count,
        budget,
        fitting,
    )
    return ViewPlan(pipeline, fitting, "drawn", wanted.seed)


def _wanted_views(cfg: DictConfig, datamodule: Any, pipeline: Any) -> ViewPlan:
    """The views `teacher_cache.views` asks for, before the budget."""
    options = cfg.teacher_cache
    setting, seed = options.get("views", "auto"), int(options.get("view_seed", 0))
    images = datamodule.replay_images()
    # Listing the finite views needs one image size for all samples: in-memory data.
    finite = pipeline.choices(images[0]) if isinstance(images, torch.Tensor) else None
    count = None if finite is None else len(finite)
    if setting == "all":
        if count is None:
            raise KdlabError(
                f"teacher_cache.views=all stores every view the augmentation can make, but {pipeline.spec()} "
                "draws from a continuous range (or images of many sizes). Set teacher_cache.views to a "
                "number of views per sample, or auto."
            )
        return ViewPlan(pipeline, count, "all", seed)
    if setting == "auto":
        epochs = planned_epochs(cfg.trainer, datamodule)
        if count is not None and count <= epochs:
            return ViewPlan(pipeline, count, "all", seed)
        return ViewPlan(pipeline, max(1, min(epochs, 10**6)), "drawn", seed)
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise KdlabError(
            f"teacher_cache.views={setting!r} is not a choice. Set a number of stored views per sample (e.g. "
            "teacher_cache.views=10), auto (one per planned epoch, or all of a small finite set), or all."
        )
    if count is not None and setting >= count:
        return ViewPlan(pipeline, count, "all", seed)
    return ViewPlan(pipeline, setting, "drawn", seed)


def _fit_features(layout: EntryLayout, samples: int, budget: float) -> tuple[str, ...]:
    """Drop the features from `layout` if they do not fit beside the logits; returns the dropped layers."""
    count = 1 if layout.views is None else layout.views.count
    if layout.feats and count * samples * layout.bytes_per_view() > budget:
        live = tuple(layout.feats)
        log.info(
            "Teacher features %s are computed live by the teacher (on the replayed views): with the logits "
            "they need %.2f GB, over teacher_cache.max_bytes=%.3g. The logits come from the cache.",
            ", ".join(live),
            count * samples * layout.bytes_per_view() / 1e9,
            budget,
        )
        layout.feats = {}
        return live
    return ()


def _key(architecture: DictConfig, datamodule: Any, weights: str, layout: EntryLayout) -> dict[str, Any]:
    """Everything the stored outputs depend on, as plain data (hashed into the entry's name)."""
    teacher = OmegaConf.to_container(architecture, resolve=True)
    teacher.pop("checkpoint", None)
    return {
        "format": FORMAT,
        "teacher": teacher,
        "weights": weights,
        "data": type(datamodule).__name__,
        "samples": datamodule.fingerprint(),
        "transform": repr(datamodule.train_transform),
        "layers": sorted(layout.feats),
        # A language model's positions too (image entries keep the key they had before them).
        "logits": [layout.codec, layout.k, *([list(layout.positions)] if layout.positions else [])],
        "views": None if layout.views is None else layout.views.spec(),
    }


def _not_worth_building(cfg: DictConfig, datamodule: Any, layout: EntryLayout, entry: Path) -> str | None:
    """Why `auto` does not build the missing entry now, or None when it does (module docstring)."""
    views = 1 if layout.views is None else layout.views.count
    build = views * datamodule.train_split_size
    # Validation is served from the cache only when it is transformed as training is.
    saved = planned_teacher_samples(cfg.trainer, datamodule, validation=layout.views is None)
    jobs = sweep_jobs()
    # The run directories that asked for this entry: a run resumed in place is the same run, so it
    # does not count as a second one (and trains as its first part did).
    asked = entry.with_name(entry.name + ".asked")
    this_run = str(Path(cfg.paths.output_dir).resolve())
    before = set(asked.read_text().splitlines()) if asked.exists() else set()
    if build <= saved * jobs or before - {this_run}:
        return None
    asked.parent.mkdir(parents=True, exist_ok=True)
    with asked.open("a") as ledger:
        ledger.write(this_run + "\n")
    by = f"this run and its sweep ({jobs} jobs)" if jobs > 1 else "this run"
    return (
        f"building it takes the teacher over {build} samples ({views} view(s) of "
        f"{datamodule.train_split_size} samples), more than the {saved * jobs:.0f} {by} would spare it; the "
        "next run of this setting builds it, or set teacher_cache.enabled=true to build it now."
    )


def planned_batches(trainer: DictConfig, datamodule: Any) -> tuple[int, float]:
    """Training batches per epoch, and in the whole run (max_epochs or max_steps, whichever ends it
    first; Lightning's default of 1000 epochs when neither is set; infinite for max_epochs=-1)."""
    limit = trainer.get("limit_train_batches")
    per_epoch = max(limited_batches(len(datamodule.train_set), datamodule.batch_size, limit), 1)
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps") or -1
    if epochs is None and steps <= 0:
        epochs = 1000
    total = per_epoch * epochs if epochs not in (None, -1) else math.inf
    if steps > 0:
        total = min(total, steps * int(trainer.get("accumulate_grad_batches") or 1))
    return per_epoch, total


def planned_epochs(trainer: DictConfig, datamodule: Any) -> int:
    """How many training epochs the run is planned for (1000 when it is not bounded)."""
    per_epoch, total = planned_batches(trainer, datamodule)
    return 1000 if math.isinf(total) else max(1, math.ceil(total / per_epoch))


def planned_teacher_samples(trainer: DictConfig, datamodule: Any, validation: bool = True) -> float:
    """How many samples the teacher would see in this run uncached: training (and validation) batches."""
    per_epoch, total = planned_batches(trainer, datamodule)
    if validation:
        val_batches = limited_batches(
            len(datamodule.val_set), datamodule.batch_size, trainer.get("limit_val_batches")
        )
        total += val_batches * total / per_epoch
    return total * datamodule.batch_size


def limited_batches(samples: int, batch_size: int, limit: int | float | None) -> int:
    """Batches per epoch under a Lightning `limit_*_batches` (a float is a fraction, an int a count)."""
    batches = math.ceil(samples / batch_size)
    if isinstance(limit, float):
        return int(batches * limit)
    return batches if limit is None else min(batches, int(limit))


def sweep_jobs() -> int:
    """How many jobs the Hydra multirun this process runs in has; 1 outside one, or when unknown.

    Read from the sweep's multirun.yaml (written before its jobs start): the product of the
    discrete sweeps' lengths, or the sweeper's n_trials (Optuna) when a sweep is a range.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            return 1
        sweep = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml")
        overrides = OverridesParser.create().parse_overrides(list(sweep.hydra.overrides.task))
    except Exception:  # not under Hydra, or the sweep's record is missing: nothing is known
        return 1
    jobs = 1
    for override in overrides:
        if not override.is_sweep_override():
            continue
        if not override.is_discrete_sweep():
            return int(OmegaConf.select(sweep, "hydra.sweeper.n_trials", default=1) or 1)
        jobs *= len(list(override.sweep_string_iterator()))
    return jobs
