"""The base LightningDataModule for image classification: arguments, splits, transforms, loaders.

Subclasses say where samples come from (`load_split`) and what the dataset's usual
augmentation is; everything the rest of kdlab relies on — the batch dict, the seeded
train/val split, eval transforms on val, the loader settings, a training order that is a
function of (seed, epoch) — is decided once here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import ClassVar

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset
from torchvision.transforms import v2

from kdlab.data.datasets import IndexedDataset, TensorBatchDataset, collate
from kdlab.data.replay import DecodedImages, ReplayedViews, ReplayPipeline
from kdlab.data.split import resolve_val_count, split_indices
from kdlab.data.transforms import as_transform_list, build_pipeline, pipeline_ends
from kdlab.errors import KdlabError

_SHAPE_ARGS = ("num_classes", "in_channels", "input_size")
# precompute_inputs=auto: at most this many bytes of float32 inputs per transform (CIFAR: 0.6 GB).
PRECOMPUTE_MAX_BYTES = 2e9
PRECOMPUTE_CHUNK = 4096
# (dataset, seed, first epoch, batch size) -> a batch sampler with set_epoch (see use_batch_sampler)
BatchSamplerFactory = Callable[[Dataset, int, int, int], Sampler]


class EpochShuffle(RandomSampler):
    """A random order that is a function of (seed, epoch), like DistributedSampler's.

    Lightning calls `set_epoch` before every training epoch. Epoch k's order then does not depend
    on how many epochs this process ran before, so a run resumed at epoch k draws the same
    batches as an uninterrupted one. Under DDP, Lightning replaces this RandomSampler with a
    DistributedSampler seeded the same way, from PL_GLOBAL_SEED and the epoch.
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # The trailing 1 keeps this stream apart from EpochSeed's (kdlab.resume), seeded from (seed, epoch).
        seed = np.random.SeedSequence([self.seed, self.epoch, 1]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


def run_seed() -> int:
    """The seed `seed_everything` set for this process, which Lightning keeps in PL_GLOBAL_SEED."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    # Unseeded, torch's own initial seed keeps the order random, as a plain RandomSampler's is.
    return int(seed) if seed is not None else torch.initial_seed()


class ImageClassificationDataModule(LightningDataModule):
    """Train/val/test loaders yielding {"input", "target", "index"} batches.

    `index` is the sample's position in its underlying split: train-set indices for both
    the train and the val loader (val is a seeded slice of the official training set),
    test-set indices for the test loader.
    """

    name: ClassVar[str] = "image dataset"
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    # Shape facts of a fixed dataset: a config value that differs is an error, not an override.
    facts: ClassVar[dict[str, int]] = {}
    # Values used when the caller leaves a non-fixed shape argument out.
    defaults: ClassVar[dict[str, int]] = {}
    # True when samples are PIL images (decoded to tensors first); False for uint8 tensors.
    decode: ClassVar[bool] = False

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: int | float = 5000,
        split_seed: int = 0,
        train_transforms: Sequence[Callable] | None = None,
        download: bool = True,
        download_dir: str = "~/.cache/kdlab/data",
        precompute_inputs: bool | str = "auto",
        views: Mapping[str, Sequence[Callable]] | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise KdlabError(
                f"data.batch_size={batch_size!r} must be a positive integer; set e.g. data.batch_size=128."
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise KdlabError(
                f"data.num_workers={num_workers!r} must be an integer >= 0 (0 loads batches in the main "
                f"process); set e.g. data.num_workers=0."
            )
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_size = val_size
        self.split_seed = split_seed
        self.download = download
        self.download_dir = download_dir
        if precompute_inputs not in ("auto", True, False):
            raise KdlabError(
                f"data.precompute_inputs={precompute_inputs!r} is not a choice: set auto (when the inputs "
                f"fit in {PRECOMPUTE_MAX_BYTES / 1e9:.0f} GB as float32), true, or false."
            )
        self.precompute_inputs = precompute_inputs
        self._inputs: dict[tuple[int, str], torch.Tensor] = {}  # precomputed, by (samples, transform)
        given = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
        for arg in _SHAPE_ARGS:
            setattr(self, arg, self._resolve_shape_arg(arg, given[arg]))
        # The statistics inputs are normalised with: the dataset's own unless the config gives others.
        self.mean = self._resolve_statistic("mean", mean)
        self.std = self._resolve_statistic("std", std)

        self.augmentation = as_transform_list(train_transforms, self.default_augmentation())
        # With augmentation switched off, train inputs still need the eval geometry (e.g. one
        # fixed size for ImageFolder) so that they batch and match what the model sees at eval.
        train_steps = self.augmentation or self.eval_geometry()
        self.train_transform = build_pipeline(train_steps, self.mean, self.std, self.decode)
        self.eval_transform = build_pipeline(self.eval_geometry(), self.mean, self.std, self.decode)
        # Extra views a loss may ask for (`Knowledge.views`): augmentation lists by name, made into
        # pipelines only for the views in use (`use_views`).
        self.view_steps = {"strong": [*self.default_augmentation(), v2.RandAugment()]}
        for name, steps in (views or {}).items():
            self.view_steps[str(name)] = as_transform_list(steps, [], key=f"data.views.{name}")
        self.views: dict[str, Callable] = {}
        # Builds the training loader's batches instead of the shuffled sampler (`use_batch_sampler`).
        self.batch_sampler_factory: BatchSamplerFactory | None = None

        self.train_set: Subset | None = None
        self.val_set: Subset | None = None
        self.test_set: IndexedDataset | None = None
        self._train_samples: Dataset | None = None

    def use_views(self, names: Sequence[str], wanted_by: str = "the knowledge") -> None:
        """Make every training batch carry these extra views (`input_<name>`), e.g. ["strong"].

        Called before the data is set up, by the entry point, with the views the losses declare.
        """
        unknown = [name for name in names if name not in self.view_steps]
        if unknown:
            raise KdlabError(
                f"{wanted_by} reads the extra view(s) {', '.join(map(repr, unknown))} of each training "
                f"sample, which {self.name} does not define (it has: {', '.join(self.view_steps)}). Define "
                f"it as a list of augmentations under data.views.{unknown[0]}, e.g. "
                f"'+data.views.{unknown[0]}=[{{_target_: torchvision.transforms.v2.RandAugment}}]'."
            )
        wanted = {
            name: build_pipeline(self.view_steps[name], self.mean, self.std, self.decode) for name in names
        }
        if wanted.keys() != self.views.keys():
            self.views = wanted
            self.train_set = None  # set up again with the views

    def use_batch_sampler(self, factory: BatchSamplerFactory | None) -> None:
        """Build the training loader's batches with `factory(dataset, seed, epoch, batch_size)`.

        For schemes that need batches of a particular make-up (CS-KD: pairs of samples of one
        class). The factory must return a torch BatchSampler whose `sampler` (a constructor argument,
        so that Lightning can put a DistributedSampler in its place under DDP) has `set_epoch`:
        Lightning calls it on `batch_sampler.sampler` every epoch, not on the batch sampler.
        """
        self.batch_sampler_factory = factory

    def replay_pipeline(self) -> ReplayPipeline:
        """The training augmentation as views drawn as parameters and replayed (kdlab.data.replay).

        Raises KdlabError naming each transform that cannot be replayed.
        """
        return ReplayPipeline(self.augmentation)

    def replay_images(self) -> torch.Tensor | DecodedImages:
        """The training split's images before augmentation: one uint8 tensor when held in memory,
        else decoded one at a time. Views are drawn for and made from these."""
        if self.train_set is None:
            self.prepare_data()
            self.setup("fit")
        images = getattr(self._train_samples, "tensors", (None,))[0]
        if images is not None:
            return images
        head, _ = pipeline_ends(self.mean, self.std, self.decode)
        return DecodedImages(self._train_samples, v2.Compose(head))

    def stored_views(
        self, pipeline: ReplayPipeline, params: torch.Tensor, spread: str, seed: int
    ) -> ReplayedViews:
        """The whole training split as the stored views `params` of `pipeline` (kdlab.data.replay)."""
        _, tail = pipeline_ends(self.mean, self.std, self.decode)
        targets = self.train_set.dataset.targets
        return ReplayedViews(
            self.replay_images(), targets, pipeline, params, v2.Compose(tail), spread, seed, self.views
        )

    def serve_stored_views(self, views: ReplayedViews) -> None:
        """Serve training batches from `views` from now on, instead of augmenting live.

        Whoever calls this sets `views.set_epoch` at the start of every training epoch (the
        teacher-output cache's callback does): under DDP Lightning's sampler does not pass it on.
        """
        if self.train_set is None:
            self.setup("fit")
        self.train_set = Subset(views, self.train_set.indices)

    # -- what subclasses provide ------------------------------------------------------------

    def load_split(self, train: bool) -> tuple[Dataset, torch.Tensor]:
        """Return the official train (or test) split as (image, target) pairs and its int64 targets."""
        raise NotImplementedError

    def default_augmentation(self) -> list[Callable]:
        """The dataset's usual train augmentation, used when `train_transforms` is None."""
        return []

    def eval_geometry(self) -> list[Callable]:
        """Resize/crop steps that bring eval images to `input_size`; none for fixed-size datasets."""
        return []

    # -- public API -------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """The name of each class, by class index, for figures and tables.

        The class indices as text here; a dataset whose format or documentation names its
        classes says so (Fashion-MNIST, CIFAR's meta files, ImageFolder's folders).
        """
        return [str(i) for i in range(self.num_classes)]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input, for building models."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def train_split_size(self) -> int:
        """How many sample indices the training split spans (its train and val parts together).

        Per-sample state keyed by `batch["index"]` (CRD's memory bank, caches) is sized by this.
        """
        if self.train_set is None:  # asked before Lightning prepared the data (e.g. to build a scheme)
            self.prepare_data()
            self.setup("fit")
        return len(self.train_set.dataset)

    def setup(self, stage: str | None = None) -> None:
        # Each split is read once; Lightning may call setup again for later stages.
        if stage in (None, "fit", "validate") and self.train_set is None:
            samples, targets = self.load_split(train=True)
            self._train_samples = samples
            self._check_labels(targets, "training")
            val_count = resolve_val_count(self.val_size, len(targets))
            train_idx, val_idx = split_indices(len(targets), val_count, self.split_seed)
            # Two views of the same samples: augmented for train, eval-transformed for val.
            train_view = self._view(
                samples, targets, self.train_transform, self.train_transform_is_random, self.views
            )
            val_view = self._view(samples, targets, self.eval_transform, random=False)
            self.train_set = Subset(train_view, train_idx.tolist())
            self.val_set = Subset(val_view, val_idx.tolist())
        if stage in (None, "test") and self.test_set is None:
            samples, targets = self.load_split(train=False)
            self._check_labels(targets, "test")
            self.test_set = self._view(samples, targets, self.eval_transform, random=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "fit", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    @property
    def train_transform_is_random(self) -> bool:
        """Whether a training sample looks different every epoch (any augmentation counts as random)."""
        return bool(self.augmentation)

    def fingerprint(self) -> str:
        """A hash of the training split's content: its samples (see `sample_digest`) and labels.

        Caches computed from the training data (the teacher-output cache) are keyed on it, so they
        are rebuilt when the files change, not only when the config does.
        """
        if self.train_set is None:
            self.prepare_data()
            self.setup("fit")
        digest = hashlib.sha256()
        self.sample_digest(self._train_samples, digest)
        digest.update(self.train_set.dataset.targets.numpy().tobytes())
        return digest.hexdigest()[:16]

    def sample_digest(self, samples: Dataset, digest: hashlib._Hash) -> None:
        """Feed what identifies the training samples into `digest` (subclasses: their pixels or files)."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------

    def _view(
        self,
        samples: Dataset,
        targets: torch.Tensor,
        transform: Callable,
        random: bool,
        views: Mapping[str, Callable] | None = None,
    ) -> IndexedDataset:
        """Samples with their index, fetched a batch at a time by one tensor index where that is exact.

        In-memory samples under a transform that draws nothing at random are fetched by tensor
        index; with `precompute_inputs` their transformed inputs are computed once, so a batch
        is a slice of one float tensor and the loader costs next to nothing per step.
        """
        images = getattr(samples, "tensors", (None,))[0]  # an in-memory TensorDataset
        if images is None or random or views:
            return IndexedDataset(samples, targets, transform, views)
        float_bytes = images.numel() * 4
        if self.precompute_inputs is True or (
            self.precompute_inputs == "auto" and float_bytes <= PRECOMPUTE_MAX_BYTES
        ):
            # Train and val (views of one split) share a tensor when their transforms agree.
            key = (id(images), repr(transform))
            if key not in self._inputs:
                chunks = [transform(chunk) for chunk in images.split(PRECOMPUTE_CHUNK)]
                self._inputs[key] = torch.cat(chunks)
            return TensorBatchDataset(self._inputs[key], targets, None)
        return TensorBatchDataset(images, targets, transform)

    def _loader(self, dataset: Dataset | None, stage: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup({stage!r}) before asking for its loader")
        sampler, generator = None, None
        if shuffle and self.batch_sampler_factory is not None:
            seed = run_seed()
            batches = self.batch_sampler_factory(dataset, seed, self._fit_epoch(), self.batch_size)
            return DataLoader(
                dataset,
                batch_sampler=batches,
                generator=torch.Generator().manual_seed(seed),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                collate_fn=collate,
                persistent_workers=self.num_workers > 0,
            )
        if shuffle:
            seed = run_seed()
            sampler = EpochShuffle(dataset, seed, self._fit_epoch())
            # Workers fetch the first epoch's items as soon as the loader is iterated, before any
            # epoch hook runs: a dataset whose items follow the epoch (stored views) starts there.
            served = getattr(dataset, "dataset", dataset)
            if hasattr(served, "set_epoch"):
                served.set_epoch(self._fit_epoch())
            # The loader draws its workers' base seed from this, not from the global RNG, whose
            # stream belongs to the training step (see kdlab.resume.EpochSeed).
            generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            # Re-forking workers every epoch costs more than keeping them for small datasets.
            persistent_workers=self.num_workers > 0,
        )

    def _fit_epoch(self) -> int:
        """The epoch Lightning will hand the train sampler first: 0, or where a resumed fit restarts.

        Loader workers fetch indices as soon as the loader is iterated, which for a fit's first
        epoch happens before Lightning's first `set_epoch`, so the sampler must start there.
        """
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def _resolve_shape_arg(self, arg: str, value: int | None) -> int:
        fact = self.facts.get(arg)
        if fact is not None and value is not None and value != fact:
            raise KdlabError(
                f"data.{arg}={value} does not match {self.name}, whose {arg} is {fact}. Set "
                f"data.{arg}={fact} (or leave it out), or pick the data config that matches your data."
            )
        resolved = value if value is not None else fact if fact is not None else self.defaults.get(arg)
        if not isinstance(resolved, int) or isinstance(resolved, bool) or resolved < 1:
            raise KdlabError(
                f"data.{arg}={resolved!r} must be a positive integer; set data.{arg} in the data config."
            )
        return resolved

    def _resolve_statistic(self, name: str, value: Sequence[float] | None) -> tuple[float, ...]:
        if value is None:
            return tuple(getattr(type(self), name))
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            values = ()
        if len(values) != self.in_channels or (name == "std" and min(values) <= 0):
            raise KdlabError(
                f"data.{name}={value!r} must be {self.in_channels} {'positive ' if name == 'std' else ''}"
                f"number(s), one per channel of the {self.name} images; {self.name}'s own are "
                f"data.{name}={list(getattr(type(self), name))} (set it back, or leave it out)."
            )
        return values

    def _check_labels(self, targets: torch.Tensor, split: str) -> None:
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise KdlabError(
                f"The {self.name} {split} labels range over {int(targets.min())}..{int(targets.max())}, "
                f"outside 0..{self.num_classes - 1} for data.num_classes={self.num_classes}. The label data "
                f"is damaged or belongs to another dataset: delete it and fetch it again, or fix "
                f"data.num_classes."
            )
