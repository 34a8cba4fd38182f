"""OFA-KD: each student stage is projected into the logit space and distilled there, for any pair of families.

Hao, Guo, Han, Tang, Hu, Wang and Xu 2023, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation" (NeurIPS). Features of a CNN, a ViT and an MLP differ in
layout and in what they encode, so OFA-KD compares none of them: a branch of its own carries each
student stage to logits, which are distilled from the teacher's logits, the one space every
classifier shares. The loss sharpens the teacher's target class adaptively (Sec. 3.3, Eq. 6):

    L_OFA = - Σ_c [ (p_t + 1_y)^ε - 1_y ]_c log p_s,c

where p = softmax(z / T) and 1_y is the label's one-hot vector: a non-target class weighs p_t,c^ε,
and the target class (1 + p_t,y)^ε - 1. For ε > 1 the target weighs more than the teacher gives it
(at least ε p_t,y) and the other classes less (p^ε < p): the target is enhanced. ε = 1 is
cross-entropy to the teacher's distribution (KD at T=1, up to a constant).

The branches (the authors' design, for a stage at depth i of n, built from the real shapes):
- a map [B, C, H, W]: stride-2 depthwise-separable convolutions (each doubling the channels, the
  last one reaching the branch width) until the map is as small as the last stage's, or a 1x1
  convolution where it already is; then global average pooling and a linear classifier;
- tokens [B, N, C] (a ViT or Mixer block): a linear map to the branch width if it differs, then
  transformer blocks (timm's, 4 heads; 3 for the first stage of 4 down to 1 for the last), then the
  class token (or the tokens' mean where there is no prefix token) and a linear classifier;
- a vector [B, C] (an MLP layer): a two-layer MLP to the logits.
The branch width is the larger of the student's last-stage width and the teacher's embedding width,
as the authors have it (`width: auto`). A branch of transformer blocks at a wide teacher's width costs
far more than the small student it trains (a 64-wide ViT under a 512-wide teacher: blocks 64 times
its own); `width: student` keeps the student's width, and a number sets it. The student's own logits
get the same loss (`logits_weight`), and the branches are dropped at deployment: they only train.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.knowledge.layouts import prefix_tokens
from kdlab.taps import Outputs


def ofa_loss(
    student: Tensor, teacher: Tensor, target: Tensor, eps: float, temperature: float = 1.0
) -> Tensor:
    """Eq. 6, averaged over the batch: - Σ_c [(p_t + 1_y)^ε - 1_y]_c log p_s,c (see the module docstring)."""
    one_hot = F.one_hot(target, student.shape[1]).to(student.dtype)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    weights = (p_teacher + one_hot).pow(eps) - one_hot
    return -(weights * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


class SeparableDown(nn.Sequential):
    """A stride-2 depthwise-separable block (the authors' SepConv): dw3x3/2, pw, BN, ReLU, dw3x3, pw,
    BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class TokenHead(nn.Module):
    """Tokens to logits: width projection, transformer blocks, the class token (or the mean), a classifier."""

    def __init__(self, channels: int, width: int, blocks: int, prefix: int, num_classes: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.project = nn.Linear(channels, width) if channels != width else nn.Identity()
        heads = 4 if width % 4 == 0 else 1
        self.blocks = nn.Sequential(*(Block(dim=width, num_heads=heads) for _ in range(blocks)))
        self.prefix = prefix
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.project(x))
        return self.classifier(x[:, 0] if self.prefix else x.mean(dim=1))


def branch_depth(index: int, stages: int) -> int:
    """Transformer blocks of the branch of stage `index` (0-based) of `stages`: the authors' 3, 2, 1, 1
    for 4 stages, and the same span (3 down to 1) for any other count."""
    if stages <= 1:
        return 1
    return max(math.ceil(3 * (stages - 1 - index) / (stages - 1)), 1)


def width_of(feature: Tensor) -> int:
    """Channels of a map [B, C, H, W] or a vector [B, C], the width of tokens [B, N, C]."""
    return feature.shape[2] if feature.ndim == 3 else feature.shape[1]


class OFA(Knowledge):
    """OFA-KD (see the module docstring): a branch per student stage, each distilled with L_OFA.

    The term is Σ_stages L_OFA(branch logits) + `logits_weight` · L_OFA(the student's logits), each
    with its stage's ε (`eps`: one value, or one per stage and then the logits'). Defaults are the
    authors' CIFAR-100 recipe (their train.py): ε = 1 (1.5 on ImageNet), T = 1, every weight 1.
    """

    key = "ofa"

    def __init__(
        self,
        eps: float | Sequence[float] = 1.0,
        temperature: float = 1.0,
        logits_weight: float = 1.0,
        weight: float = 1.0,
        task_weight: float = 1.0,
        max_stages: int = 4,
        width: int | str = "auto",
        student_layers: tuple[str, ...] | list[str] = ("stages",),
        teacher_layers: tuple[str, ...] | list[str] = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name)
        if isinstance(max_stages, bool) or not isinstance(max_stages, int) or max_stages < 1:
            raise KdlabError(
                f"knowledge.{self.name}.max_stages={max_stages!r} must be a whole number >= 1 (the authors "
                f"project 4 stages), e.g. knowledge.{self.name}.max_stages=4."
            )
        self.max_stages = max_stages
        valid_width = width in ("auto", "student") or (
            isinstance(width, int) and not isinstance(width, bool) and width >= 1
        )
        if not valid_width:
            raise KdlabError(
                f"knowledge.{self.name}.width={width!r}: use auto (the authors' max of the student's last "
                "width and the teacher's embedding width), student (the student's last width: branches as "
                "cheap as the student's own blocks), or a number of channels, e.g. 256."
            )
        self.width = width
        values = list(eps) if hasattr(eps, "__iter__") and not isinstance(eps, str) else [eps]
        self.eps = [checked_number(v, self.name, "eps", 1.0) for v in values]
        self.temperature = checked_number(
            temperature, self.name, "temperature", 1, why="it divides the logits"
        )
        self.logits_weight = checked_number(logits_weight, self.name, "logits_weight", 1, strict=False)
        if len(self.teacher_layers) > 1:
            raise KdlabError(
                f"knowledge.{self.name}.teacher_layers={list(self.teacher_layers)}: OFA reads one teacher "
                "layer, its embedding, for the branches' width: use [embedding], or [] for the student's "
                "width."
            )
        self.branches = nn.ModuleList()

    def with_layers(self, student_layers, teacher_layers) -> OFA:
        """The expanded layers, at most `max_stages` of the student's: evenly spaced from the last, as the
        authors pick blocks 3, 6, 9 and 12 of a 12-block ViT and the 4 stages (not the stem) of a ResNet."""
        layers = list(student_layers)
        if len(layers) > self.max_stages:
            n = len(layers)
            picked = sorted({n - 1 - (j * n) // self.max_stages for j in range(self.max_stages)})
            layers = [layers[i] for i in picked]
        return super().with_layers(layers, teacher_layers)

    def stage_eps(self) -> list[float]:
        """ε of each stage, then of the logits."""
        count = len(self.student_layers) + 1
        if len(self.eps) == 1:
            return self.eps * count
        if len(self.eps) != count:
            raise KdlabError(
                f"knowledge.{self.name}.eps has {len(self.eps)} values, but OFA distils {count - 1} student "
                f"stages ({', '.join(self.student_layers)}) and the logits: give one value, or {count}."
            )
        return self.eps

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        self.stage_eps()
        if not self.student_layers:
            raise KdlabError(
                f"knowledge.{self.name}.student_layers is empty: OFA needs student stages to project, "
                "e.g. [stages]."
            )
        feats = [student.feats[layer] for layer in self.student_layers]
        width = width_of(feats[-1])
        if isinstance(self.width, int):
            width = self.width
        elif self.width == "auto" and self.teacher_layers:
            width = max(width, width_of(source.feats[self.teacher_layers[0]]))
        num_classes = student.logits.shape[1]
        prefix = prefix_tokens(student.model) or 0
        last_size = feats[-1].shape[-1] if feats[-1].ndim == 4 else None
        self.branches = nn.ModuleList(
            self._branch(layer, f, i, len(feats), width, num_classes, prefix, last_size)
            for i, (layer, f) in enumerate(zip(self.student_layers, feats, strict=True))
        )
        self.branches.apply(_init).to(student.logits.device)

    def _branch(
        self, layer: str, f: Tensor, i: int, n: int, width: int, classes: int, prefix: int, last: int | None
    ) -> nn.Module:
        if f.ndim == 4:
            downs = max(round(math.log2(f.shape[-1] / last)), 0) if last else 0
            channels, blocks = f.shape[1], []
            for k in range(downs):
                out = width if k == downs - 1 else channels * 2
                blocks.append(SeparableDown(channels, out))
                channels = out
            if not blocks:
                blocks = [nn.Conv2d(channels, width, 1)]
            return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))
        if f.ndim == 3:
            return TokenHead(f.shape[2], width, branch_depth(i, n), prefix, classes)
        if f.ndim == 2:
            return nn.Sequential(nn.Linear(f.shape[1], width), nn.GELU(), nn.Linear(width, classes))
        raise KdlabError(
            f"knowledge.{self.name} reads the student's '{layer}', of shape {tuple(f.shape)}: OFA's branches "
            "take maps [B, C, H, W], tokens [B, N, C] or vectors [B, C]. Choose such layers in "
            f"knowledge.{self.name}.student_layers."
        )

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        eps = self.stage_eps()
        teacher, target = source.logits.detach(), batch["target"]
        loss = self.logits_weight * ofa_loss(student.logits, teacher, target, eps[-1], self.temperature)
        for branch, layer, e in zip(self.branches, self.student_layers, eps, strict=False):
            loss = loss + ofa_loss(branch(student.feats[layer]), teacher, target, e, self.temperature)
        return loss


def _init(module: nn.Module) -> None:
    """The authors' initialisation: He (fan-out) convolutions, unit BatchNorm, truncated-normal linears."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
