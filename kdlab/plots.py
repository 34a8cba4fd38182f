"""The figures of a run, written as PNG files and logged to W&B as images.

`PlotsCallback` draws:
- `soft_targets`: the teacher's soft targets softmax(logits / T) (Hinton et al. 2015, Eq. 1) for a
  few fixed test samples at several temperatures, one bar chart per sample and one series per T,
  which shows the class probabilities flatten as T grows;
- `confusion_matrices`: the teacher's and the student's test confusion matrices (rows normalised),
  side by side, and `per_class_accuracy`: each model's accuracy on every class;
- `agreement`: the student's top-1 agreement with the teacher (`val/student/agreement`) per epoch.

Classes are labelled with the data's names for them (the datamodule's `class_names`: e.g.
Fashion-MNIST's "T-shirt/top" ... "Ankle boot", CIFAR's from its meta file), or with their
indices when the data has none.

A scheme without a frozen teacher plots its own models: the "teacher" peer in online mode, the
student alone in baseline and self modes. The PNGs always go to `output_dir`, so a run without W&B
has them too, and every W&B logger also gets them through `WandbLogger.log_image`.

Nothing here runs per training step: the test figures read the logits that `test_step` already
returns, and the agreement curve reads one logged value per validation epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from kdlab.errors import KdlabError
from kdlab.knowledge.response import KD

#: The models the figures compare, in the order drawn; a scheme reports whichever it has.
MODELS = ("teacher", "student")
AGREEMENT = "val/student/agreement"
# Beyond this many classes, labelling every class (and writing a number in every confusion
# matrix cell) makes the labels overlap.
MAX_LABELLED_CLASSES = 20


def plotted_models(names: Iterable[str]) -> list[str]:
    """Which of a scheme's test outputs the figures show; the first one's soft targets are drawn."""
    names = set(names)
    return [name for name in MODELS if name in names]


def soft_targets(logits: Tensor, temperatures: Sequence[float]) -> Tensor:
    """`KD.soft_targets` (softmax(logits / T)) at each T: shape (len(temperatures), *logits.shape)."""
    return torch.stack([KD(temperature=t).soft_targets(logits) for t in temperatures])


def checked_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The temperatures as floats; checked when the callback is built, so before any training."""
    good = all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temperatures or [None])
    if not good:
        raise KdlabError(
            f"callbacks.plots.temperatures={list(temperatures or [])!r}: the soft-target figure needs "
            "at least one temperature, each a finite number > 0 (it divides the logits), "
            "e.g. callbacks.plots.temperatures=[1,2,4,8]."
        )
    return [float(t) for t in temperatures]


def new_figure(width: float, height: float) -> Figure:
    # An Agg canvas of its own: renders without a display, and, unlike pyplot, keeps no global
    # registry of figures, so each figure is freed once drawn.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def class_names_of(trainer: Any, classes: int) -> list[str] | None:
    """The names of the trainer's data's classes (its datamodule's `class_names`), or None when it
    has none for these `classes` classes."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    return list(names) if names is not None and len(names) == classes else None


def class_labels(classes: int, names: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """The labelled tick positions and their labels: every class up to MAX_LABELLED_CLASSES, else
    every k-th one, so that labels never overlap; each class's name, or its index without names."""
    ticks = list(range(0, classes, math.ceil(classes / MAX_LABELLED_CLASSES)))
    return ticks, [names[t] if names is not None else str(t) for t in ticks]


def class_ticks(ax: Any, axis: str, classes: int, names: Sequence[str] | None = None) -> None:
    """Label the x or y axis of `ax` with the classes (see `class_labels`)."""
    ticks, labels = class_labels(classes, names)
    if axis == "x":
        # Names are wider than a class's slot: slanted, each ending under its own tick.
        rotation = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if names is not None else {}
        ax.set_xticks(ticks, labels=labels, **rotation)
    else:
        ax.set_yticks(ticks, labels=labels, rotation=0)  # torchmetrics slants them; names read better level


def grouped_bars(ax: Any, series: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> None:
    """One bar per class for each series, the series side by side within a class."""
    classes = np.arange(len(next(iter(series.values()))))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.bar(classes + (k - (len(series) - 1) / 2) * width, values, width, label=label)
    class_ticks(ax, "x", len(classes), names)
    ax.set_xlabel("class")


def soft_targets_figure(
    probabilities: Tensor,
    temperatures: Sequence[float],
    targets: Sequence[int],
    model: str,
    names: Sequence[str] | None = None,
) -> Figure:
    """A bar chart per sample of `probabilities` (T, samples, classes), one series per T."""
    samples = probabilities.shape[1]
    figure = new_figure(4.5 * samples, 3.5)
    axes = figure.subplots(1, samples, squeeze=False, sharey=True)[0]
    for i, ax in enumerate(axes):
        series = {f"T={t:g}": probabilities[k, i].numpy() for k, t in enumerate(temperatures)}
        grouped_bars(ax, series, names)
        label = names[targets[i]] if names is not None else targets[i]
        ax.set_title(f"test sample {i} (label {label})")
    axes[0].set_ylabel("probability")
    axes[0].legend()
    figure.suptitle(f"{model}'s soft targets softmax(z / T)")
    return figure


def confusion_figure(
    metrics: Mapping[str, MulticlassConfusionMatrix], names: Sequence[str] | None = None
) -> Figure:
    """The confusion matrices side by side, each drawn by torchmetrics' own `plot`."""
    figure = new_figure(6.5 * len(metrics), 6)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (name, metric) in zip(axes, metrics.items(), strict=True):
        metric.plot(ax=ax, add_text=metric.num_classes <= MAX_LABELLED_CLASSES)
        # torchmetrics labels every class with its index: ours are the names, and fewer past
        # MAX_LABELLED_CLASSES.
        class_ticks(ax, "x", metric.num_classes, names)
        class_ticks(ax, "y", metric.num_classes, names)
        ax.set_title(f"{name} (rows normalised)" if metric.normalize == "true" else name)
    return figure


def per_class_accuracy(matrix: Tensor) -> Tensor:
    """The diagonal of a row-normalised confusion matrix: each class's share of correct predictions
    (0 for a class the test set lacks, as torchmetrics normalises an empty row to zeros)."""
    return matrix.diagonal()


def per_class_accuracy_figure(matrices: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Figure:
    """Each model's accuracy on each class of the test set, the models side by side per class."""
    classes = next(iter(matrices.values())).shape[0]
    figure = new_figure(max(6.0, 0.5 * classes * len(matrices)), 3.5)
    ax = figure.subplots()
    grouped_bars(ax, {name: per_class_accuracy(m).cpu().numpy() for name, m in matrices.items()}, names)
    ax.set_ylabel("per-class accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("per-class accuracy (test set)")
    ax.legend()
    return figure


def agreement_figure(history: Mapping[int, float]) -> Figure:
    figure = new_figure(6, 3.5)
    ax = figure.subplots()
    epochs = sorted(history)
    ax.plot(epochs, [history[e] for e in epochs], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("agreement with the teacher")
    ax.set_xticks(epochs)
    ax.set_title("student's top-1 agreement with the teacher (validation)")
    return figure


class PlotsCallback(L.Callback):
    """Draws the figures above at the end of training and of testing.

    Args:
        output_dir: where the PNG files go (the run directory's `plots/`).
        temperatures: the temperatures of the soft-target figure.
        num_samples: how many test samples the soft-target figure shows (the first ones of the
            test split, which is not shuffled, so every run shows the same images).
    """

    def __init__(
        self, output_dir: str | Path, temperatures: Sequence[float] = (1, 2, 4, 8), num_samples: int = 4
    ):
        self.output_dir = Path(output_dir)
        self.temperatures = checked_temperatures(temperatures)
        self.num_samples = int(num_samples)
        self.agreement: dict[int, float] = {}
        self._reset_test()

    def _reset_test(self) -> None:
        self.confusion: dict[str, MulticlassConfusionMatrix] = {}
        self.sample_logits: list[Tensor] = []
        self.sample_targets: list[int] = []

    # ------------------------------------------------------------------ agreement per epoch
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After validation the epoch's logged values are in callback_metrics (not yet in
        # on_validation_epoch_end); the sanity check and trainer.validate() are not epochs of training.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(AGREEMENT)
        if value is not None:
            self.agreement[trainer.current_epoch] = float(value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.agreement and trainer.is_global_zero:
            self.publish(trainer, {"agreement": agreement_figure(self.agreement)})

    def state_dict(self) -> dict[str, Any]:
        return {"agreement": dict(self.agreement)}  # so a resumed run keeps its earlier epochs

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.agreement = {int(e): float(v) for e, v in state_dict.get("agreement", {}).items()}

    # ------------------------------------------------------------------------- test figures
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_test()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Schemes return each model's test logits by name from test_step; those are all we read.
        if not isinstance(outputs, Mapping):
            return
        for name in plotted_models(outputs):
            if name not in self.confusion:
                self.confusion[name] = MulticlassConfusionMatrix(outputs[name].shape[1], normalize="true").to(
                    outputs[name].device
                )
            self.confusion[name].update(outputs[name], batch["target"])
        missing = self.num_samples - len(self.sample_targets)
        if missing > 0 and self.confusion:
            source = next(iter(self.confusion))  # the teacher when there is one
            self.sample_logits.append(outputs[source][:missing].detach().float().cpu())
            self.sample_targets += batch["target"][:missing].tolist()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.confusion:
            return
        # compute() on every process: it gathers the counts across devices.
        matrices = {name: metric.compute() for name, metric in self.confusion.items()}
        if not trainer.is_global_zero:
            return
        names = class_names_of(trainer, next(iter(matrices.values())).shape[0])
        figures = {
            "confusion_matrices": confusion_figure(self.confusion, names),  # plots the cached compute()
            "per_class_accuracy": per_class_accuracy_figure(matrices, names),
        }
        if self.sample_logits:
            probabilities = soft_targets(torch.cat(self.sample_logits), self.temperatures)
            figures["soft_targets"] = soft_targets_figure(
                probabilities, self.temperatures, self.sample_targets, next(iter(matrices)), names
            )
        self.publish(trainer, figures)
        self._reset_test()

    # ------------------------------------------------------------------------------ output
    def publish(self, trainer: L.Trainer, figures: Mapping[str, Figure]) -> None:
        """Write each figure to `<output_dir>/<name>.png` and log it to every W&B logger."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            path = self.output_dir / f"{name}.png"
            figure.savefig(path, dpi=100)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"plots/{name}", images=[str(path)], step=trainer.global_step)
