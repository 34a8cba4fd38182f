"""Overhaul of feature distillation (OFD): pre-ReLU features, a margin ReLU on the teacher, a partial L2.

Heo, Kim, Yun, Park, Kwak and Choi 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV).
Both models are read before their ReLUs, so the teacher's negative responses (which the ReLU would
erase) still inform the student, but only up to a per-channel margin taken from the teacher's
BatchNorm statistics; the student is not pushed where the ReLU would hide the difference anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.heads import norm_before
from kdlab.knowledge.base import LossContext
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs

# Below this probability of a negative response the conditional mean is numerically unreliable;
# the reference then uses -3 sigma instead.
MIN_NEGATIVE_MASS = 1e-3


def margin_from_norm(norm: nn.BatchNorm2d) -> Tensor:
    """Per-channel margin m = E[x | x < 0] for x ~ N(beta, gamma^2): the BN's shift and |scale|.

    m = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|), or -3|gamma| where the negative
    mass Phi(-beta/|gamma|) is at most 1e-3. Computed in float64, returned as a (C,) tensor.
    """
    channels = norm.num_features
    weight = norm.weight if norm.weight is not None else torch.ones(channels)
    bias = norm.bias if norm.bias is not None else torch.zeros(channels)
    # A zero scale is a constant response: the tiny floor gives its limit (beta if negative, else 0).
    std = weight.detach().double().abs().clamp_min(1e-12)
    mean = bias.detach().double()
    below = torch.special.ndtr(-mean / std)
    density = torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi)
    conditional = mean - std * density / below.clamp_min(MIN_NEGATIVE_MASS)
    return torch.where(below > MIN_NEGATIVE_MASS, conditional, -3 * std)


def partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """sum over positions of d_p(sigma_m(t), s), averaged over the batch.

    sigma_m(t) = max(t, m) is the teacher transform; d_p skips a position where the student is at
    or below a non-positive target (s <= t <= 0): the ReLU would hide that difference anyway.
    """
    target = torch.maximum(t, margin)
    counted = (s > target) | (target > 0)
    return ((s - target).pow(2) * counted).sum() / s.shape[0]


class Connector(nn.Sequential):
    """The student transform: 1x1 conv (C_s -> C_t, no bias: BN follows) + BatchNorm, initialised
    as the reference does (He-normal by the output fan, BN scale 1 and shift 0)."""

    def __init__(self, in_channels: int, out_channels: int):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
        super().__init__(conv, nn.BatchNorm2d(out_channels))


class OFD(LayerPairKnowledge):
    """Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV), Sec. 3.

    For each layer pair i (pre-ReLU features of both models), the distillation loss is
    d_p(sigma_{m_i}(F_t^i), r_i(F_s^i)), where
    - sigma_m(x) = max(x, m) is the margin ReLU (teacher transform), with the per-channel margin
      m = E[x | x < 0] of a Gaussian whose mean and standard deviation are the shift and |scale| of
      the teacher's BatchNorm before that ReLU: m = beta - |gamma| phi(beta/|gamma|) /
      Phi(-beta/|gamma|) (-3|gamma| where Phi(-beta/|gamma|) <= 1e-3, as in the reference);
    - r_i is the student transform, a 1x1 conv + BN (built from the real widths);
    - d_p(T, S) = sum_j (T_j - S_j)^2, skipping positions j where S_j <= T_j <= 0 (partial L2).
    As in the reference code, the squared distances are summed over channels and positions and
    averaged over the batch, the teacher's map is adaptive-average-pooled to the student's size,
    and layer i of n is weighted 1 / 2^(n - i) (the deepest 1). The margins are computed once in
    build() from the teacher's BatchNorm (kdlab.heads.norm_before), as the reference does.

    Defaults are the reference recipe (mdistiller's OFD config, which is the authors' CIFAR code's
    `loss_distill.sum() / batch_size / 1000`): weight 1e-3, cross-entropy weight 1, every stage's
    pre-ReLU output of both models (mdistiller's preact_feats[1:]).

    Where kdlab differs from the reference: its teacher runs in train mode (BatchNorm on batch
    statistics) during distillation; kdlab's offline teacher stays frozen in eval mode. When the
    source is itself being trained (online peers), its BatchNorm moves, so the margins are
    recomputed from it (detached) at every step instead of once. mdistiller pairs lists of
    different lengths by their deepest entries; kdlab asks for equal lengths (the message names
    the deepest ones). A source without BatchNorm points (the tutorial nets, BYOT's exits, an
    ensemble) is refused with a KdlabError.
    """

    key = "ofd"

    def __init__(
        self,
        weight: float = 1e-3,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages_preact",),
        teacher_layers: str | Sequence[str] = ("stages_preact",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        self.connectors = nn.ModuleList()
        self.margin_count = 0
        self.refresh_margins = False

    def maps(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        """(student map, detached teacher map) per pair; both must be 4-D."""
        feats = self.pairs(student, source)
        for index, (s, t) in enumerate(feats):
            for side, x in (("student", s), ("teacher", t)):
                if x.ndim != 4:
                    layer = (self.student_layers if side == "student" else self.teacher_layers)[index]
                    raise KdlabError(
                        f"OFD compares pre-ReLU feature maps, (batch, channels, height, width), but the "
                        f"{side}'s layer '{layer}' gives shape {tuple(x.shape)}. Set "
                        f"knowledge.{self.name}.{side}_layers to pre-activation stages, e.g. [stages_preact]."
                    )
        return feats

    def norms(self, model: nn.Module | None) -> list[nn.BatchNorm2d]:
        """The teacher's BatchNorm before each of teacher_layers (not registered as submodules)."""
        what = f"knowledge.{self.name} (OFD)"
        if model is None:
            raise KdlabError(
                f"{what} takes its margins from the teacher's BatchNorm before each pre-ReLU layer, but "
                "this scheme's source has no model of its own (BYOT's exits, an ensemble, a bank of past "
                "predictions). Use OFD with a frozen teacher (mode=offline) or peers (mode=online, "
                "mode.target=peers)."
            )
        if not getattr(model, "norm_points", None):
            raise KdlabError(
                f"{what} takes its margins from the teacher's BatchNorm before each pre-ReLU layer, but "
                f"the teacher ({type(model).__name__}) names none (it has no `norm_points`, e.g. the "
                "tutorial nets, which have no BatchNorm). Use a teacher with pre-activation tap points "
                "(a CIFAR ResNet, WRN or torchvision ResNet, e.g. model@teacher=resnet32x4), or pick "
                "another feature loss (e.g. knowledge=fitnet)."
            )
        return [norm_before(model, layer, what) for layer in self.teacher_layers]

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.margin_count)]

    def set_margins(self, norms: list[nn.BatchNorm2d], like: Tensor) -> None:
        for i, norm in enumerate(norms):
            margin = margin_from_norm(norm).to(device=like.device, dtype=like.dtype)
            # Derived from the teacher at build time, so not saved with the student.
            self.register_buffer(f"margin{i}", margin, persistent=False)
        self.margin_count = len(norms)

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        feats = self.maps(student, source)
        norms = self.norms(source.model)
        for index, ((_, t), norm) in enumerate(zip(feats, norms, strict=True)):
            if norm.num_features != t.shape[1]:
                raise KdlabError(
                    f"knowledge.{self.name} (OFD): the teacher's '{self.teacher_layers[index]}' has "
                    f"{t.shape[1]} channels but the BatchNorm the model names for it has "
                    f"{norm.num_features}. Check the model's norm_points, or use its stage<k>_preact taps."
                )
        self.set_margins(norms, feats[0][1])
        # A source being trained (an online peer) has a moving BatchNorm: its margins follow it.
        self.refresh_margins = any(p.requires_grad for norm in norms for p in norm.parameters())
        self.connectors = nn.ModuleList(
            Connector(s.shape[1], t.shape[1]).to(device=s.device, dtype=s.dtype) for s, t in feats
        )

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        feats = self.maps(student, source)
        if len(self.connectors) != len(feats):
            raise KdlabError(
                f"knowledge.{self.name} (OFD) was built for {len(self.connectors)} layer pairs but is "
                f"given {len(feats)}. Call build() with outputs of the same layers before the first "
                "forward (a scheme does this)."
            )
        if self.refresh_margins:
            self.set_margins(self.norms(source.model), feats[0][1])
        n = len(feats)
        loss = feats[0][0].new_zeros(())
        for i, ((s, t), margin) in enumerate(zip(feats, self.margins(), strict=True)):
            s = self.connectors[i](s)
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
            loss = loss + partial_l2(s, t, margin.to(s.dtype).view(1, -1, 1, 1)) / 2 ** (n - 1 - i)
        return loss
