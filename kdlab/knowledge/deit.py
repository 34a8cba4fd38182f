"""DeiT's distillation token: the student's own head learns from the teacher, its class head from the labels.

Touvron, Cord, Douze, Massa, Sablayrolles and Jégou 2021, "Training data-efficient image transformers
& distillation through attention" (ICML), Sec. 5. The student is a vision transformer with two extra
tokens: the class token and the distillation token, each read by its own linear head. The class head
learns from the labels; the distillation head learns from the teacher; at test time the model
predicts with the average of the two heads' logits. The token and its head belong to the student:
timm's distilled DeiTs (`timm/deit_tiny_distilled_patch16_224` and its siblings) have them, and kdlab
names their heads `class_head` and `distillation_head` (tap points). The results table shows each head
and their average (the student's row).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.taps import Outputs

VARIANTS = ("hard", "soft")
REDUCTIONS = ("batchmean", "elementwise")


class DeiT(Knowledge):
    """DeiT's objective on a student with a distillation token, one term holding both of its parts.

    With Z_cls and Z_dist the class and distillation heads' logits, Z_t the teacher's, y the label,
    ψ the softmax and λ = `mix`:

    - hard (Eq. 3, the paper's choice): y_t = argmax Z_t, and
      L = (1 - λ) CE(ψ(Z_cls), y) + λ CE(ψ(Z_dist), y_t), with λ = 1/2;
    - soft (Eq. 2, the distillation token's variant): L = (1 - λ) CE(ψ(Z_cls), y)
      + λ τ² KL(ψ(Z_t/τ) || ψ(Z_dist/τ)), with τ = 3 and λ = 0.1 (the paper's soft setting).

    The cross-entropy on the labels is part of this term, on the class head alone, so the recipe's
    task weight is 0: the scheme's own cross-entropy would read the averaged logits, which DeiT does
    not train. `label_smoothing` smooths the teacher's hard label (Sec. 5: ε = 0.1 is the paper's
    option; its code uses none). The KL is averaged over the batch (`reduction: batchmean`, the
    paper's equation); the authors' code divides its sum by batch x classes instead
    (`reduction: elementwise`), which makes λ act C times smaller.
    """

    key = "deit"

    def __init__(
        self,
        variant: str = "hard",
        mix: float = 0.5,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        reduction: str = "batchmean",
        weight: float = 1.0,
        task_weight: float = 0.0,
        student_layers: tuple[str, ...] | list[str] = ("class_head", "distillation_head"),
        teacher_layers: tuple[str, ...] | list[str] = (),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name)
        if variant not in VARIANTS:
            raise KdlabError(
                f"knowledge.{self.name}.variant={variant!r} is not a DeiT variant: use hard (the "
                "distillation head learns the teacher's top class, the paper's choice) or soft (its "
                "temperature softmax)."
            )
        if reduction not in REDUCTIONS:
            raise KdlabError(
                f"knowledge.{self.name}.reduction={reduction!r}: use batchmean (the paper's KL, per sample) "
                "or elementwise (the authors' code: the KL's sum over batch x classes)."
            )
        if len(self.student_layers) != 2:
            raise KdlabError(
                f"knowledge.{self.name}.student_layers={list(self.student_layers)}: DeiT reads two heads "
                "of the student, the class head and the distillation head, e.g. "
                "[class_head, distillation_head]."
            )
        self.variant, self.reduction = variant, reduction
        self.mix = checked_number(mix, self.name, "mix", 0.5, strict=False)
        if self.mix > 1:
            raise KdlabError(
                f"knowledge.{self.name}.mix={mix}: λ shares the loss between the labels (1 - λ) and the "
                f"teacher (λ), so it lies in [0, 1]; the paper uses 0.5 (hard) and 0.1 (soft)."
            )
        self.temperature = checked_number(
            temperature, self.name, "temperature", 3, why="it divides the logits"
        )
        self.label_smoothing = checked_number(
            label_smoothing, self.name, "label_smoothing", 0.1, strict=False
        )

    def check_model(self, model: nn.Module, side: str, role: str) -> None:
        if side != "student":
            return
        points = getattr(model, "tap_points", {})
        missing = [layer for layer in self.student_layers if layer not in points]
        if missing:
            raise KdlabError(
                f"knowledge.{self.name} (DeiT) trains the {role}'s distillation token, but the {role} "
                f"({type(model).__name__}) has no {' and no '.join(missing)}: it has no distillation token. "
                f"Use a distilled DeiT from timm, e.g. model@{'student' if role == 'student' else role}="
                "timm/deit_tiny_distilled_patch16_224 (small versions: +student.depth=2 "
                "+student.embed_dim=32 +student.num_heads=2 +student.patch_size=4), or a response loss "
                "such as knowledge=kd."
            )

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        class_logits, distillation_logits = (student.feats[layer] for layer in self.student_layers)
        labels = F.cross_entropy(class_logits, batch["target"])
        teacher = source.logits.detach()
        if self.variant == "hard":
            distillation = F.cross_entropy(
                distillation_logits, teacher.argmax(dim=1), label_smoothing=self.label_smoothing
            )
        else:
            t = self.temperature
            divergence = F.kl_div(
                F.log_softmax(distillation_logits / t, dim=1),
                F.log_softmax(teacher / t, dim=1),
                reduction="sum",
                log_target=True,
            )
            per_element = self.reduction == "elementwise"
            scale = distillation_logits.numel() if per_element else len(distillation_logits)
            distillation = divergence * t * t / scale
        return (1 - self.mix) * labels + self.mix * distillation
