"""Offline distillation: a pretrained teacher, frozen, teaches the student.

The teacher is never optimised and never leaves eval mode: its parameters take no
gradient, it is not in the optimizer, `train()` cannot switch it back, and its forward
pass runs under `no_grad`. On the test set the scheme also reports how well the student
mimics the teacher: top-1 agreement and the mean KL(teacher || student) at T=1. Agreement is
also tracked every validation epoch (`val/student/agreement`), so it can be followed over training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kdlab.schemes.student import StudentScheme
from kdlab.taps import Outputs

# Lightning warns about modules in eval mode when fit starts: the frozen teacher is, on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


class Offline(StudentScheme):
    """Student learns from a frozen teacher through the configured knowledge losses."""

    teacher_role = "pretrained"

    def __init__(self, teacher: nn.Module, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_tap = self.tap(teacher, "teacher", "teacher")
        self.add_metrics("teacher", validate=False)
        self.agreement = MulticlassAccuracy(self.num_classes, top_k=1)
        self.val_agreement = MulticlassAccuracy(self.num_classes, top_k=1)
        self.mean_kl = MeanMetric()
        self.prepare()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # Lightning calls train() every epoch; the teacher stays frozen
        return self

    @torch.no_grad()
    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs:
        return self.teacher_tap(x)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = super().validation_step(batch, batch_idx)
        # The cost of this metric: one extra teacher forward per validation batch (no backward).
        teacher = self.teacher(batch["input"])
        self.val_agreement.update(logits[self.model_name], teacher.argmax(dim=1))
        self.log("val/student/agreement", self.val_agreement, on_epoch=True)
        return logits

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = super().test_step(batch, batch_idx)
        student, teacher = logits[self.model_name], logits["teacher"]
        self.agreement.update(student, teacher.argmax(dim=1))
        kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none")
        self.mean_kl.update(kl.sum(dim=1))
        self.log("test/student/agreement", self.agreement, on_epoch=True)
        self.log("test/student/kl_to_teacher", self.mean_kl, on_epoch=True)
        return logits

    def models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, **super().models()}
