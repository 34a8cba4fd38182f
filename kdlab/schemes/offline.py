"""Offline distillation: a pretrained teacher, frozen, teaches the student.

The teacher is never optimised and never leaves eval mode: its parameters take no
gradient, it is not in the optimizer, `train()` cannot switch it back, and its forward
pass runs under `no_grad`. (Not `inference_mode`: the losses save the teacher's outputs for
the student's backward, which inference tensors may not be.) Conv teachers run in channels_last
memory format by default (`teacher_channels_last`), which oneDNN and cuDNN run faster, and
`teacher_compile` (true, or torch.compile's arguments) compiles the teacher. AMP needs no switch
of its own: `trainer.precision=bf16-mixed` autocasts the whole step, teacher included.

With the teacher-output cache (kdlab.teacher_cache) attached, training batches take the
teacher's outputs from it by sample index (and, with augmentation, by the stored view the batch
replays), and validation batches too where the train and eval transforms are the same; the
teacher then runs only on the test set, and for features too large to store. On the test set the
scheme also reports how well the student mimics the teacher: top-1 agreement and the mean
KL(teacher || student) at T=1. Agreement is also tracked every validation epoch
(`val/student/agreement`), so it can be followed over training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kdlab.errors import KdlabError
from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.student import StudentScheme
from kdlab.taps import Outputs
from kdlab.tasks import fraction_correct

if TYPE_CHECKING:
    from kdlab.teacher_cache import TeacherOutputs

# The batch key that marks generated text (on-policy samples, SeqKD's teacher text): the cache holds the
# teacher's outputs on the data's windows, so for these the teacher runs.
GENERATED = "generated"

# Lightning warns about modules in eval mode when fit starts: the frozen teacher is, on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


class Offline(StudentScheme):
    """Student learns from a frozen teacher through the configured knowledge losses."""

    name = "offline"

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """The frozen teacher: `teacher.checkpoint`, else the store's (trained first if missing)."""
        teacher, record = store.frozen_teacher(cfg, datamodule)
        return Sources(
            modules={"teacher": teacher},
            architectures={"teacher": cfg.teacher.name},
            frozen=record,
            frozen_config=cfg.teacher,
        )

    def __init__(
        self,
        teacher: nn.Module,
        *args,
        teacher_channels_last: bool = True,
        teacher_compile: bool | Mapping | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_channels_last = bool(teacher_channels_last)
        if self.teacher_channels_last:
            self.teacher.to(memory_format=torch.channels_last)  # only 4-D (conv) weights change layout
        if teacher_compile:
            # In place (Module.compile), so the state_dict keys stay the teacher's own; the tap's
            # hooks are traced into the graph on the first call.
            options = {} if teacher_compile is True else dict(teacher_compile)
            try:
                self.teacher.compile(**options)
            except TypeError as error:  # an argument torch.compile does not take
                raise KdlabError(
                    f"mode.teacher_compile={options} is not a set of torch.compile arguments ({error}). "
                    "Set mode.teacher_compile=true for the defaults, or pass only torch.compile's "
                    "arguments, e.g. {mode: max-autotune} or {backend: inductor}."
                ) from None
        self.teacher_outputs: TeacherOutputs | None = None
        self.cache_covers_validation = False
        self.teacher_tap = self.tap(teacher, "teacher", "teacher")
        self.add_metrics("teacher", validate=False)
        # The fraction of samples on which the student's top-1 class is the teacher's.
        self.agreement = fraction_correct(self.num_classes)
        self.val_agreement = fraction_correct(self.num_classes)
        self.mean_kl = MeanMetric()
        self.prepare()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # Lightning calls train() every epoch; the teacher stays frozen
        return self

    def use_teacher_outputs(self, outputs: TeacherOutputs | None, covers_validation: bool = False) -> None:
        """Serve the teacher's outputs from `outputs` (by sample index) instead of running it."""
        self.teacher_outputs = outputs
        self.cache_covers_validation = covers_validation and outputs is not None

    @torch.no_grad()
    def teacher_forward(self, x: Tensor) -> Outputs:
        if self.teacher_channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.teacher_tap(x)

    @torch.no_grad()
    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs:
        if self.teacher_outputs is not None and "index" in batch and GENERATED not in batch:
            cached = self.teacher_outputs.lookup(batch["index"], view=batch.get("view"))
            feats = cached.feats
            if self.teacher_outputs.live_layers:  # features over the cache's budget: the teacher runs
                live = self.teacher_forward(x).feats
                feats = {**feats, **{layer: live[layer] for layer in self.teacher_outputs.live_layers}}
            # The live teacher stays reachable for losses that use its parts (its head: kdlab.heads).
            return Outputs(cached.logits, feats, model=self.teacher)
        return self.teacher_forward(x)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = super().validation_step(batch, batch_idx)
        # The cost of this metric: one teacher forward per validation batch, unless it is cached.
        if self.cache_covers_validation:
            teacher = self.teacher_outputs.lookup(batch["index"]).logits
        else:
            teacher = self.teacher_forward(batch["input"]).logits
        student, labels = self.task.predictions(logits[self.model_name], batch["target"])
        teacher, _ = self.task.predictions(teacher, batch["target"])
        self.val_agreement.update(student, teacher.argmax(dim=1))
        self.log("val/student/agreement", self.val_agreement, on_epoch=True)
        return logits

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = super().test_step(batch, batch_idx)
        # Per counted token for a language model (kdlab.tasks).
        student, _ = self.task.predictions(logits[self.model_name], batch["target"])
        teacher, _ = self.task.predictions(logits["teacher"], batch["target"])
        self.agreement.update(student, teacher.argmax(dim=1))
        kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none")
        self.mean_kl.update(kl.sum(dim=1))
        self.log("test/student/agreement", self.agreement, on_epoch=True)
        self.log("test/student/kl_to_teacher", self.mean_kl, on_epoch=True)
        return logits

    def models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, **super().models()}
