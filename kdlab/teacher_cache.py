"""The teacher-output cache: a frozen teacher's logits and tapped features, computed once per sample.

In offline KD the teacher is frozen, so on un-augmented data it gives the same answer for a
sample every epoch; recomputing it is most of the cost of a step. With the cache on, the first
run computes the teacher's outputs for every training-split sample (one inference pass, with a
progress bar), stores them in fp16 in the teacher store, and every later epoch, run and sweep
job serves them by `batch["index"]` instead of calling the teacher.

**Key.** The entry is keyed by a hash of: the teacher's weights (their sha256, as resume checks it),
its architecture config, the dataset class, a hash of the training samples themselves
(`datamodule.fingerprint()`: pixels and labels, or file names, sizes and times), the train
transform, and the tapped layers.
Changing any of these makes a new entry; stale ones are never served.

**Augmentation: refused.** With random augmentation the student sees a new view of each sample
every epoch, and the teacher must see that view too. FKD (Shen & Xing 2022) instead stores
outputs per (sample, augmentation seed) and replays the augmentation; that needs every crop's
outputs to be computed up front (one teacher pass per epoch to be trained, the same cost as not
caching, paid before the first step) and a replayable augmentation pipeline. kdlab keeps the
uncached path for augmented training and caches only where the answer is exact: `enabled=auto`
logs a one-line reason and trains uncached; `enabled=true` stops with that reason.

**When auto builds.** An existing entry is always used. A missing one is built only when this run
alone would make at least as many teacher passes as building costs (one over the training split),
so a short trial run is not slowed down; `enabled=true` builds it regardless, for later runs.

**Budget.** Logits always fit (N x classes x 2 bytes: 1.1 MB for Fashion-MNIST). Features can be
large (CRD's embeddings, FitNets' maps); the whole entry must fit in `max_bytes`, else the cache
is refused with the size it would need.

**Safety.** One process builds an entry while others wait on its file lock (sweeps, DDP ranks);
the file is written under a temporary name and renamed, so a killed build leaves nothing that a
later run would load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from kdlab.data.datasets import collate
from kdlab.errors import KdlabError
from kdlab.store import build_once, content_key, save_atomic
from kdlab.taps import FeatureTap, Outputs

log = logging.getLogger(__name__)

OUTPUTS = "outputs.pt"
# Bumped when the stored layout changes, so old entries are not misread.
FORMAT = 1


class TeacherOutputs:
    """Cached teacher outputs for every training-split index: fp16 logits and features.

    Without augmentation each table is [N, ...]: one row per sample. With stored views
    (kdlab.data.replay) it is [N, K, ...]: one row per sample and view, and `lookup` takes the
    batch's view numbers too.
    """

    def __init__(self, logits: Tensor, feats: Mapping[str, Tensor], views: int | None = None):
        self.logits = logits
        self.feats = dict(feats)
        self.views = views  # K for per-view tables, None for one row per sample

    def to(self, device: torch.device) -> TeacherOutputs:
        feats = {k: v.to(device) for k, v in self.feats.items()}
        return TeacherOutputs(self.logits.to(device), feats, self.views)

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def lookup(
        self, index: Tensor, dtype: torch.dtype = torch.float32, view: Tensor | None = None
    ) -> Outputs:
        """The outputs for a batch of sample indices (and, for stored views, the batch's view numbers),
        on the index's device, as `dtype`."""
        rows = index.to(self.device)
        if self.views is not None:
            if view is None:
                raise KdlabError(
                    "The cached teacher outputs hold one row per stored view of each sample, but the batch "
                    "says which view none of its images is. Serve training batches from the stored views "
                    "(kdlab.data.replay.ReplayedViews, whose items carry 'view')."
                )
            rows = (rows, view.to(self.device))

        def take(table: Tensor) -> Tensor:
            return table[rows].to(index.device, dtype, non_blocking=True)

        return Outputs(take(self.logits), {name: take(table) for name, table in self.feats.items()})


@dataclass
class CachePlan:
    """Whether a run can use the cache, and if so where its entry is."""

    entry: Path | None
    reason: str | None = None  # why the cache cannot be used; None when it can

    @property
    def usable(self) -> bool:
        return self.reason is None


def cache_spec(
    architecture: DictConfig, datamodule: Any, weights: str, layers: tuple[str, ...]
) -> dict[str, Any]:
    """Everything the cached outputs depend on, as plain data (hashed into the entry's key).

    Not the data config as such: the split, batch size and location do not change any sample's
    outputs, so all runs on the same samples share one entry.
    """
    teacher = OmegaConf.to_container(architecture, resolve=True)
    teacher.pop("checkpoint", None)
    return {
        "format": FORMAT,
        "teacher": teacher,
        "weights": weights,
        "data": type(datamodule).__name__,
        "samples": datamodule.fingerprint(),
        "transform": repr(datamodule.train_transform),
        "layers": list(layers),
    }


def entry_bytes(num_samples: int, example: Outputs) -> int:
    """fp16 bytes of one entry: logits and features for `num_samples`, from one example's shapes."""
    per_sample = example.logits[0].numel() + sum(f[0].numel() for f in example.feats.values())
    return num_samples * per_sample * 2


def plan(
    cfg: DictConfig, architecture: DictConfig, datamodule: Any, weights: str, tap: FeatureTap
) -> CachePlan:
    """Decide whether this run may use the cache (`teacher_cache.enabled`), and which entry it reads.

    `architecture` is the teacher's model config and `weights` the sha256 of its weights
    (`kdlab.resume.teacher_identity`); `tap` reads the teacher's features for the run's knowledge.
    """
    setting = cfg.teacher_cache.enabled
    if setting not in ("auto", True, False):
        raise KdlabError(
            f"teacher_cache.enabled={setting!r} is not a choice. Set teacher_cache.enabled=auto (cache "
            "when it is exact), true (require it) or false (always run the teacher)."
        )
    if setting is False:
        return CachePlan(None, "teacher_cache.enabled=false")
    with torch.no_grad():  # one sample gives the per-sample sizes of the logits and features
        example = tap(torch.zeros(1, *datamodule.input_shape, device=next(tap.model.parameters()).device))
    reason = refusal(cfg, datamodule, example)
    if reason is not None:
        if setting is True:
            raise KdlabError(
                f"teacher_cache.enabled=true, but the teacher's outputs cannot be cached: {reason} "
                "Fix that, or set teacher_cache.enabled=auto to train uncached in that case."
            )
        log.info("Teacher outputs are not cached: %s", reason)
        return CachePlan(None, reason)
    spec = cache_spec(architecture, datamodule, weights, tap.layers)
    name = str(architecture.get("name", "teacher")).replace("/", "_")
    entry = Path(cfg.teacher_cache.dir).expanduser() / f"{name}-{content_key(spec)}"
    build_cost, run_cost = datamodule.train_split_size, planned_teacher_samples(cfg.trainer, datamodule)
    if setting == "auto" and not (entry / OUTPUTS).exists() and run_cost < build_cost:
        reason = (
            f"building it takes a teacher pass over {build_cost} samples, more than the {run_cost:.0f} this "
            "run would make; set teacher_cache.enabled=true to build it anyway for later runs to share."
        )
        log.info("Teacher outputs are not cached: %s", reason)
        return CachePlan(None, reason)
    return CachePlan(entry)


def planned_teacher_samples(trainer: DictConfig, datamodule: Any) -> float:
    """How many samples the teacher would see in this run uncached: training and validation batches."""
    epochs = trainer.get("max_epochs")
    train_batches = limited_batches(
        len(datamodule.train_set), datamodule.batch_size, trainer.get("limit_train_batches")
    )
    total = train_batches * epochs if epochs not in (None, -1) else math.inf
    steps = trainer.get("max_steps") or -1
    if steps > 0:
        total = min(total, steps * int(trainer.get("accumulate_grad_batches") or 1))
    val_batches = limited_batches(
        len(datamodule.val_set), datamodule.batch_size, trainer.get("limit_val_batches")
    )
    return (total + val_batches * total / max(train_batches, 1)) * datamodule.batch_size


def limited_batches(samples: int, batch_size: int, limit: int | float | None) -> int:
    """Batches per epoch under a Lightning `limit_*_batches` (a float is a fraction, an int a count)."""
    batches = math.ceil(samples / batch_size)
    if isinstance(limit, float):
        return int(batches * limit)
    return batches if limit is None else min(batches, int(limit))


def refusal(cfg: DictConfig, datamodule: Any, example: Outputs) -> str | None:
    """Why the cache cannot give exactly the outputs the teacher would, or None when it can."""
    if datamodule.train_transform_is_random:
        names = ", ".join(type(step).__name__ for step in datamodule.augmentation)
        return (
            f"the training data is augmented at random ({names}), so the teacher sees a new view of each "
            "sample every epoch; set data.train_transforms=[] to train without augmentation and cache."
        )
    needed = entry_bytes(datamodule.train_split_size, example)
    budget = float(cfg.teacher_cache.max_bytes)
    if needed > budget:
        return (
            f"the logits and the features the knowledge reads need {needed / 1e9:.2f} GB in fp16, over "
            f"teacher_cache.max_bytes={budget:.3g}; raise it, or tap fewer or smaller teacher layers."
        )
    return None


@torch.no_grad()
def compute(
    forward: Callable[[Tensor], Outputs], datamodule: Any, device: torch.device, batch_size: int
) -> TeacherOutputs:
    """Run the frozen teacher (`forward`: the scheme's, with its memory format and compilation)
    over every training-split sample, with the train transform, in index order."""
    view = datamodule.train_set.dataset  # the whole training split, train and validation parts
    # A private generator: building the cache must not move the global RNG the run is seeded with.
    loader = torch.utils.data.DataLoader(
        view,
        batch_size=batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    logits, feats = [], {}
    for batch in tqdm(loader, desc="Caching teacher outputs", unit="batch", dynamic_ncols=True):
        x = batch["input"].to(device, non_blocking=True)
        out = forward(x)
        logits.append(out.logits.half().cpu())
        for name, value in out.feats.items():
            feats.setdefault(name, []).append(value.contiguous().half().cpu())
    return TeacherOutputs(torch.cat(logits), {name: torch.cat(chunks) for name, chunks in feats.items()})


class _OneView(torch.utils.data.Dataset):
    """View `view` of every image (kdlab.data.replay), for computing the teacher's outputs on it."""

    def __init__(self, images: Tensor, pipeline: Any, params: Tensor, tail: Callable, view: int):
        self.images, self.pipeline, self.params, self.tail, self.view = images, pipeline, params, tail, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        row = self.params[index, self.view] if self.params.ndim == 3 else self.params[self.view]
        return self.tail(self.pipeline.apply(self.images[index], row))


@torch.no_grad()
def compute_views(
    forward: Callable[[Tensor], Outputs],
    images: Tensor,
    pipeline: Any,
    params: Tensor,
    tail: Callable[[Tensor], Tensor],
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
) -> TeacherOutputs:
    """The frozen teacher's outputs on every stored view of every image: fp16 tables [N, K, ...].

    `params` are the views (kdlab.data.replay: [N, K, width], or [K, width] shared by every image);
    each view is made exactly as ReplayedViews makes it for training, so the student and the stored
    outputs see the same image.
    """
    count = params.shape[-2]
    logits, feats = [], {}
    progress = tqdm(total=count * len(images), desc="Caching teacher outputs on stored views", unit="img")
    for view in range(count):
        loader = torch.utils.data.DataLoader(
            _OneView(images, pipeline, params, tail, view), batch_size=batch_size, num_workers=num_workers
        )
        view_logits, view_feats = [], {}
        for x in loader:
            out = forward(x.to(device, non_blocking=True))
            view_logits.append(out.logits.half().cpu())
            for name, value in out.feats.items():
                view_feats.setdefault(name, []).append(value.contiguous().half().cpu())
            progress.update(len(x))
        logits.append(torch.cat(view_logits))
        for name, chunks in view_feats.items():
            feats.setdefault(name, []).append(torch.cat(chunks))
    progress.close()
    stacked = {name: torch.stack(per_view, dim=1) for name, per_view in feats.items()}
    return TeacherOutputs(torch.stack(logits, dim=1), stacked, views=count)


def load_or_build(
    entry: Path, forward: Callable[[Tensor], Outputs], datamodule: Any, device: torch.device, batch_size: int
) -> TeacherOutputs:
    """The entry's outputs: read, or computed and stored first (one process builds; the rest wait)."""
    path = entry / OUTPUTS

    def build(entry: Path) -> None:
        log.info(
            "Computing the teacher's outputs once for %d samples into %s",
            len(datamodule.train_set.dataset),
            entry,
        )
        outputs = compute(forward, datamodule, device, batch_size)
        state = {"logits": outputs.logits, "feats": outputs.feats}
        save_atomic(lambda p: torch.save(state, p), path)

    build_once(entry, OUTPUTS, build, "computing the teacher's outputs for the cache")
    try:
        # mmap: ranks and concurrent jobs on one machine share the pages instead of each holding a copy.
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict) or not {"logits", "feats"} <= set(state):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"it holds {found}, not the logits and feats kdlab writes")
    except Exception as error:
        raise KdlabError(
            f"The cached teacher outputs in {path} cannot be read ({error}). Delete the folder {entry} and "
            "rerun: the outputs are recomputed from the teacher."
        ) from None
    outputs = TeacherOutputs(state["logits"], state["feats"])
    expected = len(datamodule.train_set.dataset)
    if len(outputs.logits) != expected:
        raise KdlabError(
            f"The cached teacher outputs in {path} hold {len(outputs.logits)} samples, but the training "
            f"split has {expected}. The entry is damaged: delete {entry} and rerun to rebuild it."
        )
    return outputs


def cache_callback(
    cfg: DictConfig, scheme: Any, datamodule: Any, weights: str, architecture: DictConfig
) -> TeacherCache | None:
    """The callback that serves `scheme`'s frozen teacher from the cache, or None when it cannot."""
    cache = plan(cfg, architecture, datamodule, weights, scheme.teacher_tap)
    if not cache.usable:
        return None
    return TeacherCache(cache.entry, cfg.teacher_cache.device_bytes)


class TeacherCache(L.Callback):
    """Attaches the cached teacher outputs to an offline scheme when fitting starts.

    At `on_fit_start` the scheme is on its device and the data is set up, on every rank; the
    outputs are read (or built on this device) and handed to `scheme.use_teacher_outputs`.
    On a GPU they are kept in device memory when they fit in `device_bytes`, else in host memory.
    """

    def __init__(self, entry: Path, device_bytes: float = 2e9):
        self.entry = Path(entry)
        self.device_bytes = float(device_bytes)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        outputs = load_or_build(
            self.entry, pl_module.teacher_forward, datamodule, pl_module.device, datamodule.batch_size
        )
        size = outputs.logits.nbytes + sum(v.nbytes for v in outputs.feats.values())
        if pl_module.device.type != "cpu" and size <= self.device_bytes:
            outputs = outputs.to(pl_module.device)
        # Validation batches are served too when they are transformed as training batches are.
        same = repr(datamodule.train_transform) == repr(datamodule.eval_transform)
        pl_module.use_teacher_outputs(outputs, covers_validation=same)
        log.info("Teacher outputs served from the cache %s (%.1f MB)", self.entry, size / 1e6)
