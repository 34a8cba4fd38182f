"""What every scheme shares: the student, its knowledge losses, optimisation and metrics.

A scheme is a LightningModule that decides *where* knowledge comes from (subclasses say
that); this base owns the rest: the weighted loss sum, each term logged on its own, the
optimizer over the student and the loss adapters only, torchmetrics top-1/top-5, and a
check that stops a run whose loss became NaN with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kdlab.errors import KdlabError
from kdlab.knowledge import Knowledge
from kdlab.taps import FeatureTap, Outputs, expand_layers

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1, plus top-5 where it means something (20 classes or more)."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1)}
    if num_classes >= 20:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5)
    return MetricCollection(metrics, prefix=prefix)


class Scheme(L.LightningModule):
    """Base of all schemes. Subclasses attach their sources, then call `self.prepare()`.

    Args:
        student: the model being trained (for teacher training, the teacher itself).
        optimizer: a partial optimizer, called with the trainable parameters.
        num_classes / input_shape: from the datamodule; used to check the models.
        knowledge: named `Knowledge` losses, summed with their weights.
        scheduler: a partial LR scheduler, stepped every `scheduler_interval`.
        task_weight: cross-entropy weight; null takes the recipe value of the only
            knowledge term (e.g. 0.1 for KD), or 1.0 when there are several or none.
        model_name: how the trained model is named in metric keys ("student", "teacher").
        num_samples: the training split's index count, for losses with per-sample state.
    """

    #: whether run.py must hand this scheme a frozen, pretrained teacher
    needs_teacher = False

    def __init__(
        self,
        student: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        input_shape: tuple[int, int, int],
        knowledge: Mapping[str, Knowledge] | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        task_weight: float | None = None,
        model_name: str = "student",
        num_samples: int | None = None,
    ):
        super().__init__()
        self.student = student
        self.knowledge = nn.ModuleDict(dict(knowledge or {}))
        for name, term in self.knowledge.items():
            if not isinstance(term, Knowledge):
                raise KdlabError(
                    f"knowledge.{name} built a {type(term).__name__}, not a kdlab Knowledge loss. "
                    "Its _target_ must name a subclass of kdlab.knowledge.Knowledge."
                )
        for term in self.knowledge.values():
            term.num_samples = num_samples
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.num_classes = num_classes
        self.model_name = model_name
        self.task_weight = self._resolve_task_weight(task_weight)
        # Lightning uses this for the model summary; prepare() uses it for the dry forward.
        self.example_input_array = torch.zeros(2, *input_shape)
        self.student_tap = self._tap(student, "student", model_name)
        self.val_metrics = accuracy_metrics(num_classes, f"val/{model_name}/")
        self.test_metrics = nn.ModuleDict({model_name: accuracy_metrics(num_classes, f"test/{model_name}/")})

    # ----------------------------------------------------------------- construction
    def _resolve_task_weight(self, task_weight: float | None) -> float:
        if task_weight is not None:
            return float(task_weight)
        terms = list(self.knowledge.values())
        return terms[0].task_weight if len(terms) == 1 else 1.0

    def _tap(self, model: nn.Module, side: str, role: str) -> FeatureTap:
        """A tap on `model` for the layers the knowledge terms read on `side` (student/teacher).

        Group names ("stages", "last_stage") are expanded for this model first, in place, so each
        term's `student_layers`/`teacher_layers` name the features it will find in `Outputs.feats`.
        """
        attribute = f"{side}_layers"
        for term in self.knowledge.values():
            setattr(term, attribute, tuple(expand_layers(model, getattr(term, attribute), role)))
        return FeatureTap(
            model, [layer for t in self.knowledge.values() for layer in getattr(t, attribute)], role
        )

    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs | None:
        """The knowledge source for this batch (detached), or None when there is none."""
        return None

    @torch.no_grad()
    def prepare(self) -> None:
        """One dry forward: check the models' shapes and build the losses' adapters."""
        was_training = self.student.training
        self.student.eval()  # so the dry pass leaves BatchNorm statistics untouched
        try:
            x = self.example_input_array
            student = self.student_tap(x)
            self._check_logits(student.logits, self.model_name)
            source = self.sources(x, {})
            if source is not None:
                self._check_logits(source.logits, "teacher")
                for term in self.knowledge.values():
                    term.build(student, source)
        finally:
            self.student.train(was_training)

    def _check_logits(self, logits: Tensor, role: str) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise KdlabError(
                f"The {role} outputs logits of shape {tuple(logits.shape)}, but the data has "
                f"{self.num_classes} classes, so its predictions cannot be compared with the labels "
                f"or with the other model. Build the {role} with num_classes={self.num_classes} "
                f"(e.g. {role}.num_classes=${{data.num_classes}}), or load a checkpoint trained on this data."
            )

    # ---------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def loss_terms(self, student: Outputs, source: Outputs | None, batch: Mapping[str, Tensor]) -> dict:
        """Unweighted loss terms: the task loss plus each knowledge term."""
        terms = {"task": F.cross_entropy(student.logits, batch["target"])}
        if source is not None:
            for name, term in self.knowledge.items():
                terms[name] = term(student, source, batch)
        return terms

    def weighted_sum(self, terms: Mapping[str, Tensor]) -> Tensor:
        loss = self.task_weight * terms["task"]
        for name, term in self.knowledge.items():
            if name in terms:
                loss = loss + term.weight * terms[name]
        return loss

    def on_train_epoch_start(self) -> None:
        # Losses with schedules (e.g. DKD's warm-up) read the epoch from here, not from kwargs.
        for term in self.knowledge.values():
            term.epoch = self.current_epoch

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["input"]
        student = self.student_tap(x)
        terms = self.loss_terms(student, self.sources(x, batch), batch)
        loss = self.weighted_sum(terms)
        self.log_dict({f"train/{name}": value for name, value in terms.items()}, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self._last_terms = terms
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Checked at the logging cadence only: the check syncs with the GPU.
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) != 0:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in self._last_terms.items())
            raise KdlabError(
                f"The training loss became {float(loss)} at step {self.trainer.global_step} "
                f"(epoch {self.current_epoch}; terms: {values}). Training stopped; checkpoints "
                "saved so far are kept in the run directory. Lower the learning rate "
                "(optimizer.lr), lower the weight of the term that diverged, or check the data."
            )

    # -------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.val_metrics.update(self.student(batch["input"]), batch["target"])
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Every reported model's test metrics; returns their logits for subclasses."""
        logits = {name: model(batch["input"]) for name, model in self.models().items()}
        for name, out in logits.items():
            self.test_metrics[name].update(out, batch["target"])
            self.log_dict(self.test_metrics[name], on_epoch=True)
        return logits

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the loss adapters' parameters: never a teacher's."""
        params = list(self.student.parameters()) + list(self.knowledge.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def models(self) -> dict[str, nn.Module]:
        """The models this scheme reports on, by name (for the final results table)."""
        return {self.model_name: self.student}
