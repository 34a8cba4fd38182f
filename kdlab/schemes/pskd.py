"""Progressive Self-Knowledge Distillation (`mode=pskd`): the model's own last-epoch predictions teach it.

Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets" (ICCV). The
per-sample memory of predictions is kdlab.schemes.pskd_bank.PredictionBank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.schemes.pskd_bank import PredictionBank
from kdlab.schemes.student import StudentScheme
from kdlab.taps import Outputs


def refuse_feature_knowledge(templates: Mapping, method: str, source: str) -> None:
    for name, term in templates.items():
        if term.teacher_layers:
            raise KdlabError(
                f"mode={method} distils from {source}, which carry no features, but knowledge.{name} reads "
                f"{list(term.teacher_layers)}. Use response-based knowledge (e.g. knowledge=dml, kd, dkd or "
                "dist), or mode=byot, whose deepest exit has features."
            )


class PSKD(StudentScheme):
    """Progressive Self-Knowledge Distillation (Kim et al. 2021, Sec. 3, Eq. 5-7).

    The source for each sample is the model's own softmax for it from the previous epoch, kept
    in a `PredictionBank` keyed by `batch["index"]`. The loss is (1 - alpha_t) * task +
    alpha_t * sum_k w_k * knowledge_k, with alpha_t rising linearly from 0 at the first epoch to
    `alpha_T` at the last. With the default knowledge (`dml`: KL at T=1, weight 1) this is
    exactly PS-KD's cross-entropy against (1 - alpha_t) * y + alpha_t * p_{t-1}, up to a constant.
    A sample without an earlier prediction (the first epoch) is its own source, so its knowledge
    terms are zero. Paper default alpha_T = 0.8.
    """

    name = "pskd"
    tasks = ("image",)  # its bank and pairs are per image

    def __init__(self, *args, alpha_T: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_feature_knowledge(self.templates, "pskd", "the model's own past predictions")
        for name, term in self.templates.items():
            if term.views:
                raise KdlabError(
                    "mode=pskd learns from the model's own past prediction for each sample, kept for one "
                    f"view, but knowledge.{name} compares predictions on extra views "
                    f"({', '.join(term.views)}), which the bank does not hold. Use it with mode=offline or "
                    "mode=online, or knowledge=dml here."
                )
        if not self.templates:
            raise KdlabError(
                "mode.method=pskd needs a knowledge term to compare the model with its past predictions. "
                "Use knowledge=dml (PS-KD's loss: KL at T=1)."
            )
        if not self.num_samples:
            raise KdlabError(
                "PS-KD keeps one prediction per training sample, so it needs the training split's size, but "
                "the scheme got none. Build it through kdlab.build, or pass num_samples."
            )
        self.bank = PredictionBank(self.num_samples, self.num_classes)
        PredictionBank.alpha(0, 2, alpha_T)  # raises the clear error for alpha_T outside [0, 1]
        self.alpha_T = float(alpha_T)
        self.prepare()

    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs:
        return Outputs(self.student(x).detach())  # the dry forward: the model is its own source

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        student = self.student_tap(batch["input"])
        epoch, index = self.current_epoch, batch["index"]
        previous, known = self.bank.previous(index, epoch)
        own = student.logits.detach()
        source = Outputs(torch.where(known[:, None], previous.clamp_min(1e-12).log(), own))
        terms = self.loss_terms(student, source, batch)
        alpha = PredictionBank.alpha(epoch, self.trainer.max_epochs or 1, self.alpha_T)
        loss = (1 - alpha) * self.task_weight * terms["task"]
        for name, term in self.knowledge.items():
            loss = loss + alpha * term.weight * terms[name]
        self.bank.store(index, own.softmax(dim=1), epoch)
        self.log("train/alpha", alpha, on_step=False, on_epoch=True, sync_dist=True)  # once per epoch
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, (1 - alpha) * self.task_weight * terms["task"])
