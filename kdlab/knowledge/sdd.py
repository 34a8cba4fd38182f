"""SDD: logit distillation on local regions of the final feature map, not only on the whole image.

Wei, Luo & Luo 2024, "Scale Decoupled Distillation" (CVPR). The final feature map of each model is
average-pooled at several scales (1x1: the whole image, 2x2, 4x4 ...); every region's pooled
feature goes through that model's own classifier, giving one logit vector per region, and the
student's are distilled from the teacher's region by region with a logit loss (KD or DKD). Regions
where the teacher's local prediction disagrees with its global one in correctness carry the
ambiguity the paper wants the student to attend to, so they weigh more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.heads import classifier_in_features, classifier_of, through_classifier
from kdlab.knowledge.base import LossContext, checked_number, linear_warmup
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.knowledge.response import binary_log_probs, non_target
from kdlab.taps import Outputs

BASES = ("kd", "dkd")
#: the warm-up each base has in the reference code (epochs; SD-KD has none)
REFERENCE_WARMUP = {"kd": 0, "dkd": 20}


def regions(fmap: Tensor, scales: Sequence[int]) -> Tensor:
    """(N * B, C): the map average-pooled to m x m for each scale m, region-major (all samples'
    first region, then all samples' second, ...), N = sum of m^2, as the reference orders them."""
    pooled = torch.cat([F.adaptive_avg_pool2d(fmap, m).flatten(2) for m in scales], dim=2)
    return pooled.permute(2, 0, 1).reshape(-1, fmap.shape[1])


# Why SDD reads one layer of each model, for its error messages.
ONE_LAYER = "classifies regions of the feature map each model's classifier pools"


class SDD(LayerPairKnowledge):
    """Wei, Luo & Luo 2024, "Scale Decoupled Distillation" (CVPR), Sec. 3: L = L_CE + alpha * L_SDD,
    L_SDD = D_con + beta * D_com.

    Multi-scale pooling of the final feature map (scales M, `scales`) gives N = sum_m m^2 regions
    per sample; region j's feature goes through the model's classifier (the student's own, trained
    by this loss; the teacher's through `kdlab.heads.through_classifier`, detached), giving logits
    z_S^j and z_T^j, and each region pair is distilled with the base loss D (`base`: KD at T, or DKD
    with alpha, beta at T), each scaled by T^2. A region is *complementary* when the teacher's local
    prediction is right and its global (1x1) prediction wrong, or the reverse; otherwise it is
    *consistent* (the global region always is). Complementary regions weigh `complementary_weight`
    (beta = 2 in the reference), consistent ones 1, and the weighted sum is divided by N * B (the
    reference's normalisation: with scales [1] it is plain KD / DKD averaged over the batch). With
    `base: dkd` the loss ramps up linearly over `warmup_epochs` (null: the base's reference, 20 for
    DKD, none for KD), counting epochs from 1 as the reference does.

    Defaults are the reference CIFAR-100 recipe of SD-DKD (shicaiwei123/SDD-CVPR2024,
    `mdistiller/distillers/SDD_DKD.py`, mdistiller's DKD defaults): M = [1, 2, 4], alpha 1, beta 8,
    T 4, warm-up 20, cross-entropy weight 1. SD-KD (`base: kd`) has T 4, KD weight 0.9 and
    cross-entropy weight 0.1 there. The layers default to `embedding:input`, the final map the
    classifier's global pooling reads (for the CIFAR ResNets this is `last_stage`).

    Where kdlab differs from the anchor: the reference pools 2x2 and 1x1 from the 4x4 pooled map,
    which equals pooling the map directly when its size divides by 4 (8x8 on CIFAR); kdlab pools
    each scale from the map itself, so the 1x1 region is exactly the global feature on any size. The
    reference zeroes NaN terms; kdlab's log-space softmaxes do not produce them.
    """

    key = "sdd"

    def __init__(
        self,
        base: str = "dkd",
        scales: Sequence[int] = (1, 2, 4),
        complementary_weight: float = 2.0,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup_epochs: int | None = None,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("embedding:input",),
        teacher_layers: str | Sequence[str] = ("embedding:input",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        if base not in BASES:
            raise KdlabError(
                f"knowledge.{self.name}.base={base!r} is not one of {', '.join(BASES)}: the logit loss "
                "applied to every region ('kd': Hinton's KD, 'dkd': decoupled KD). Set "
                f"knowledge.{self.name}.base=dkd (the paper's SD-DKD) or kd."
            )
        self.base = base
        scales = [scales] if isinstance(scales, int) else list(scales)
        ok = all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in scales)
        if not scales or not ok or len(set(scales)) != len(scales) or 1 not in scales:
            raise KdlabError(
                f"knowledge.{self.name}.scales={scales!r}: the scales must be distinct whole numbers >= 1 "
                "(each m pools the final map to m x m regions) and include 1, the whole image, whose "
                "teacher prediction decides which regions are complementary. Set "
                f"knowledge.{self.name}.scales=[1,2,4] (the reference M)."
            )
        self.scales = tuple(scales)
        self.complementary_weight = checked_number(
            complementary_weight, self.name, "complementary_weight", 2, strict=False
        )
        self.temperature = checked_number(
            temperature, self.name, "temperature", 4, why="it divides the logits"
        )
        self.alpha, self.beta = float(alpha), float(beta)
        if warmup_epochs is None:
            warmup_epochs = REFERENCE_WARMUP[base]
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise KdlabError(
                f"knowledge.{self.name}.warmup_epochs={warmup_epochs!r} must be a whole number >= 0 (the "
                "epochs over which the loss ramps up linearly), or null for the base's reference (20 "
                f"for dkd, 0 for kd). Set knowledge.{self.name}.warmup_epochs=20."
            )
        self.warmup_epochs = warmup_epochs
        self.check_one_layer(ONE_LAYER, "embedding:input")

    @property
    def label(self) -> str:
        return f"knowledge.{self.name} (SDD)"

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        s, t = self.one_pair(student, source, ONE_LAYER, "embedding:input")
        for side, outputs, x in (("student", student, s), ("teacher", source, t)):
            layer = (self.student_layers if side == "student" else self.teacher_layers)[0]
            if outputs.model is None:
                raise KdlabError(
                    f"{self.label} classifies regions of each model's final feature map with that "
                    f"model's own classifier, but the {side}'s outputs carry no model: they come from an "
                    "auxiliary exit (mode=byot), an ensemble or stored predictions, whose classifier kdlab "
                    "cannot reach. Use SDD with a frozen teacher (mode=offline) or peers (mode=online, "
                    "mode.target=peers)."
                )
            if x.ndim != 4:
                raise KdlabError(
                    f"SDD pools the final feature map at scales {list(self.scales)}, so it needs a (batch, "
                    f"channels, height, width) map, but the {side}'s layer '{layer}' gives shape "
                    f"{tuple(x.shape)}. Set knowledge.{self.name}.{side}_layers=[embedding:input] (the map "
                    "the classifier's global pooling reads)."
                )
            width = classifier_in_features(outputs.model, self.label)
            if x.shape[1] != width:
                raise KdlabError(
                    f"SDD passes regions of the {side}'s '{layer}' ({x.shape[1]} channels) through its "
                    f"classifier, which reads {width} features, so that is not the map the classifier "
                    f"pools. Set knowledge.{self.name}.{side}_layers to the input of its global pooling "
                    "(e.g. [embedding:input])."
                )
            if max(self.scales) > min(x.shape[-2:]):
                raise KdlabError(
                    f"SDD pools the {side}'s '{layer}' into up to {max(self.scales)}x{max(self.scales)} "
                    f"regions, but that map is only {x.shape[-2]}x{x.shape[-1]}, so the regions would "
                    f"repeat pixels. Use smaller scales, e.g. knowledge.{self.name}.scales=[1,2], or larger "
                    "inputs."
                )

    def warmup_factor(self, context: LossContext | None) -> float:
        return linear_warmup(context, self.warmup_epochs, self.name, "SDD")

    def region_losses(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        """The base loss of every region, (N * B,), each scaled by T^2."""
        T = self.temperature
        s, t = z_s / T, z_t / T
        if self.base == "kd":
            kl = F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1), reduction="none")
            return kl.sum(dim=1) * T**2
        mask = F.one_hot(target, s.shape[1]).bool()
        tckd = F.kl_div(binary_log_probs(s, mask), binary_log_probs(t, mask).exp(), reduction="none").sum(1)
        s_rest, t_rest = non_target(s, mask), non_target(t, mask)
        nckd = F.kl_div(F.log_softmax(s_rest, dim=1), F.softmax(t_rest, dim=1), reduction="none").sum(1)
        return (self.alpha * tckd + self.beta * nckd) * T**2

    def region_weights(self, z_t: Tensor, target: Tensor, batch: int) -> Tensor:
        """1 for consistent regions, complementary_weight where the teacher's local prediction is right
        and its global one wrong, or the reverse (never the global region itself)."""
        start = sum(m * m for m in self.scales[: self.scales.index(1)]) * batch
        local_right = z_t.argmax(dim=1) == target
        global_right = local_right[start : start + batch].repeat(z_t.shape[0] // batch)
        is_global = torch.zeros_like(local_right)
        is_global[start : start + batch] = True
        complementary = (local_right != global_right) & ~is_global
        ones = torch.ones_like(z_t[:, 0])
        return torch.where(complementary, ones * self.complementary_weight, ones)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        ((s, t),) = self.pairs(student, source)
        # The student's own head, trained by this loss; the teacher's, detached.
        z_s = classifier_of(student.model, self.label)(regions(s, self.scales))
        z_t = through_classifier(source.model, regions(t.to(s.dtype), self.scales), self.label)
        z_t = z_t.detach().to(z_s.dtype)
        target = batch["target"].repeat(z_s.shape[0] // s.shape[0])
        losses = self.region_losses(z_s, z_t, target)
        weights = self.region_weights(z_t, target, s.shape[0])
        return self.warmup_factor(context) * (losses * weights).sum() / losses.numel()
