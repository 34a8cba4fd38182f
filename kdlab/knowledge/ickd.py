"""ICKD: inter-channel correlation, so the student keeps the teacher's diversity of channels.

Liu et al. 2021, "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge
Distillation" (ICCV). Each sample's feature map gives a channel-by-channel correlation matrix (how
alike every pair of channels responds over the positions); the student, after a 1x1 conv adapter
to the teacher's channel count, learns to reproduce the teacher's matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.feature import FeatureKnowledge


class ChannelEmbed(nn.Module):
    """ICKD's student adapter: 1x1 conv (C_s -> C_t, no bias) + BatchNorm, no activation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def channel_correlation(f: Tensor) -> Tensor:
    """(B, C, C): each sample's Gram matrix F F^T over positions, each row L2-normalised."""
    f = f.flatten(2)
    return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)


class ICKD(FeatureKnowledge):
    """Liu et al. 2021, "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge
    Distillation" (ICCV), Sec. 3: the inter-channel correlation loss (ICKD-C).

    For a (C, H*W) map F, the inter-channel correlation is G = F F^T (C x C) with each row
    L2-normalised; the student's map first goes through a 1x1 conv + BatchNorm adapter to the
    teacher's C channels. Per layer pair the loss is the squared Frobenius distance summed over the
    batch and divided by C * B, i.e. the squared L2 distance between matching rows averaged over the
    batch and the rows, as the authors' CIFAR-100 code does (ADLab-AutoDrive/ICKD
    `Cifar100/distiller_zoo/ICKD.py`); pairs are summed. The spatial sizes may differ (G is C x C
    whatever H*W), so nothing is pooled.

    Defaults are the authors' CIFAR-100 recipe (`scripts/run_cifar_distill.sh`, the README): the last
    stage of both models, weight 2.5 (`-b 2.5`), cross-entropy weight 1, no KD term (`-a 0`, the
    "ICKD-C (w/o KL)" row; compose `knowledge=[ickd,kd]` for the "+KL" variant).

    Where kdlab differs from the anchor: the authors' code also builds a teacher-side adapter that
    the loss never uses; kdlab builds none (it would be an optimised parameter with no gradient).
    torchdistill's ImageNet port (`ChSimLoss`) divides by C * B^2 and uses a 3x3 conv adapter; kdlab
    follows the CIFAR code, whose weight the recipe's 2.5 belongs to.
    """

    key = "ickd"
    accepts = "inter-channel correlations of feature maps"

    def __init__(
        self,
        weight: float = 2.5,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("last_stage",),
        teacher_layers: str | Sequence[str] = ("last_stage",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)
        self.embeds = nn.ModuleList()

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        # Any spatial sizes (the correlation is over channels), but more than one position each.
        self.require_maps(index, s, t, allow_vectors=False)
        for side, x in (("student", s), ("teacher", t)):
            if x.shape[-2] * x.shape[-1] < 2:
                layer = (self.student_layers if side == "student" else self.teacher_layers)[index]
                raise KdlabError(
                    f"ICKD correlates channels over the positions of a feature map, but the {side}'s layer "
                    f"'{layer}' {tuple(x.shape)} has a single position, where the correlation says nothing "
                    f"but each channel's sign. Pick a map with several positions for "
                    f"knowledge.{self.name}.{side}_layers, e.g. [last_stage]."
                )

    def build_pairs(self, feats: list[tuple[Tensor, Tensor]]) -> None:
        self.embeds = nn.ModuleList(
            ChannelEmbed(s.shape[1], t.shape[1]).to(device=s.device, dtype=s.dtype) for s, t in feats
        )

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        g_s = channel_correlation(self.embeds[index](s))
        g_t = channel_correlation(t.to(g_s.dtype))
        batch, channels = g_s.shape[0], g_s.shape[1]
        return (g_s - g_t).pow(2).sum() / (channels * batch)
