"""Knowledge review (ReviewKD): each student stage learns from the teacher's stages up to its own depth.

Chen, Liu, Zhao and Jia 2021, "Distilling Knowledge via Knowledge Review" (CVPR). Instead of
pairing stage i of the student with stage i of the teacher, the student's features are fused from
the deepest level upwards by attention-based fusion (ABF) modules, so the output compared with the
teacher's level i carries the student's levels i..N (the "review" path); each level is compared
with the hierarchical context loss (HCL), an MSE over a small spatial pyramid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import LossContext, linear_warmup
from kdlab.knowledge.feature import as_map
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs

#: HCL's pyramid: each map is also compared average-pooled to 4x4, 2x2 and 1x1
PYRAMID = (4, 2, 1)


def hierarchical_context_loss(s: Tensor, t: Tensor, levels: Sequence[int] = PYRAMID) -> Tensor:
    """HCL of one level: MSE of the maps (weight 1) plus MSE of their l x l average pools.

    A pyramid level is used only where it is smaller than the map; the k-th level used is weighted
    1/2^k, and the weighted sum is divided by the sum of the weights used, as in the reference code.
    """
    loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
    for size in levels:
        if size >= min(s.shape[-2:]):
            continue  # pooling would not summarise anything
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
        total += weight
    return loss / total


def whole_number(value: object, key: str, name: str, smallest: int, meaning: str, reference: int) -> None:
    """Raise a KdlabError naming `knowledge.<key>.<name>` unless `value` is a whole number >= `smallest`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise KdlabError(
            f"knowledge.{key}.{name}={value!r}: {name} must be a whole number >= {smallest} ({meaning}). "
            f"Set it to such a number, e.g. knowledge.{key}.{name}={reference} (the reference value)."
        )


class AttentionFusion(nn.Module):
    """ABF (Fig. 3a): reduce the student's map to `mid` channels, fuse it with the residual from the
    deeper level by two per-position attention weights, then a 3x3 conv + BN to the teacher's width.

    Returns (output compared with the teacher, residual handed to the next shallower level).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        # The deepest level has nothing to fuse with.
        self.attention = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        for conv in (self.reduce[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the reference's initialisation

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


class ReviewKD(LayerPairKnowledge):
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR), Sec. 3 (the residual
    learning framework of Fig. 2d, ABF of Fig. 3a, HCL of Fig. 3b).

    With student features F_s^1..F_s^n (shallow to deep) and teacher features F_t^1..F_t^n, the
    review loss is sum_i D(U_i, F_t^i), where U_n = ABF_n(F_s^n) and, going up,
    U_i = ABF_i(F_s^i, residual of ABF_{i+1}): level i reviews the student's levels i..n. D is the
    hierarchical context loss: per level, the MSE of the maps (weight 1) plus the MSE of their 4x4,
    2x2 and 1x1 adaptive average pools, only those smaller than the map, the k-th of them used
    weighted 1/2^k, all divided by the sum of the weights used. ABF (one per level, built from
    the real shapes) reduces the student's map to `mid` = min(max_mid_channels, channels of the
    student's deepest level) channels by 1x1 conv + BN, fuses it with the deeper residual
    (nearest-upsampled) by two sigmoid attention maps from a 1x1 conv, nearest-resizes to the
    teacher's map size and maps to the teacher's width by 3x3 conv + BN. The loss is multiplied
    by the reference's warm-up min(epoch / warmup_epochs, 1), with epochs counted from 1 as
    mdistiller does, so it needs the run's epoch (`context`).

    Defaults are mdistiller's CIFAR-100 recipe for resnet32x4 -> resnet8x4 (configs/cifar100/
    reviewkd.yaml and engine/cfg.py): weight 5, cross-entropy 1, 20 warm-up epochs, at most 512
    mid channels; the student's post-ReLU stages and pooled embedding (STU_PREACT false; use
    student_layers [stages_preact, embedding] for the pre-activation option) against the
    teacher's pre-ReLU stages and pooled embedding. A (B, C) embedding is read as a 1x1 map.
    Online, each peer reviews the other's levels as a teacher's; under BYOT each exit offers one
    map (the deepest stage's shape) and its pooled vector, so the review has those two levels.

    Where kdlab differs from the reference: sizes come from the real features instead of the
    per-architecture SHAPES/OUT_SHAPES tables (the same numbers for the models they list, and
    (height, width) instead of square sizes); a pyramid level is skipped when it is not smaller
    than the map's shorter side (the reference looks at the height only: the same on square maps).
    The authors' own training script counts epochs from 0, so its first epoch has no review loss;
    mdistiller's (followed here) counts from 1, so every adapter trains from the first step.
    """

    key = "reviewkd"

    def __init__(
        self,
        weight: float = 5.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages", "embedding"),
        teacher_layers: str | Sequence[str] = ("stages_preact", "embedding"),
        warmup_epochs: int = 20,
        max_mid_channels: int = 512,
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        whole_number(warmup_epochs, self.name, "warmup_epochs", 0, "0: no warm-up", 20)
        whole_number(max_mid_channels, self.name, "max_mid_channels", 1, "the fusion modules' width cap", 512)
        self.warmup_epochs = warmup_epochs
        self.max_mid_channels = max_mid_channels
        self.fusions = nn.ModuleList()

    def maps(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        """Each level's (student map, detached teacher map), shallow to deep; vectors as 1x1 maps."""
        feats = []
        for index, (s, t) in enumerate(self.pairs(student, source)):
            for side, x in (("student", s), ("teacher", t)):
                if x.ndim not in (2, 4):
                    layer = (self.student_layers if side == "student" else self.teacher_layers)[index]
                    raise KdlabError(
                        f"ReviewKD fuses (batch, channels, height, width) maps (or pooled (batch, channels) "
                        f"vectors), but the {side}'s layer '{layer}' gives shape {tuple(x.shape)}. Set "
                        f"knowledge.{self.name}.{side}_layers to convolutional stages and the pooled "
                        "embedding, e.g. [stages, embedding]."
                    )
            feats.append((as_map(s), as_map(t)))
        return feats

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        feats = self.maps(student, source)
        mid = min(self.max_mid_channels, feats[-1][0].shape[1])
        last = len(feats) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(s.shape[1], mid, t.shape[1], fuse=index < last).to(device=s.device, dtype=s.dtype)
            for index, (s, t) in enumerate(feats)
        )

    def warmup_factor(self, context: LossContext | None) -> float:
        return linear_warmup(context, self.warmup_epochs, self.name, "ReviewKD")

    def reviewed(self, feats: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """U_1..U_n: the fused student maps, computed from the deepest level up."""
        outputs: list[Tensor] = [None] * len(feats)  # type: ignore[list-item]  # filled deepest first
        residual = None
        for index in reversed(range(len(feats))):
            s, t = feats[index]
            outputs[index], residual = self.fusions[index](s, residual, tuple(t.shape[-2:]))
        return outputs

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        factor = self.warmup_factor(context)
        feats = self.maps(student, source)
        if len(self.fusions) != len(feats):
            raise KdlabError(
                f"knowledge.{self.name} (ReviewKD) was built for {len(self.fusions)} levels but is given "
                f"{len(feats)}. Call build() with outputs of the same layers before the first forward "
                "(a scheme does this)."
            )
        review = self.reviewed(feats)
        loss = torch.stack([hierarchical_context_loss(u, t) for u, (_, t) in zip(review, feats, strict=True)])
        return factor * loss.sum()
