"""SimKD: the student reuses the teacher's classifier, and is deployed with it.

Chen, Mei, Zhang, Wang, Wang, Feng, Chen, "Knowledge Distillation with the Reused Teacher
Classifier", CVPR 2022. A projector P (1x1 conv, 3x3 conv, 1x1 conv, each with BatchNorm and
ReLU, a bottleneck of C_t/factor channels) maps the student's last feature map to the teacher's,
and the only loss is their mean squared error (Eq. 2):

    L_SimKD = || f_t - P(f_s) ||_2^2 (mean over elements),

with the larger map average-pooled to the smaller one's size first. No cross-entropy: the
student is classified by the teacher's own, frozen classifier on the pooled projection, so
the authors' recipe (github:DefangChen/SimKD, `-c 0 -d 0 -b 1`) trains with this loss alone
(task_weight 0). The deployed student is then backbone + projector + the teacher's classifier
(`SimKDStudent`); the scheme evaluates, reports and saves that model, and says so.

SimKD needs a teacher whose classifier does not learn: it refuses a source whose classifier
has trainable parameters (peers in mode=online, an exit in self-distillation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.heads import classifier_in_features, classifier_of
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.knowledge.feature import pool_to_common_size
from kdlab.knowledge.pairs import layer_list
from kdlab.taps import FeatureTap, Outputs


class SimKDProjector(nn.Sequential):
    """The authors' bottleneck projector: C_s -> C_t/factor -> C_t/factor -> C_t, conv-BN-ReLU each."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        mid = max(out_channels // factor, 1)
        super().__init__(
            nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SimKDStudent(nn.Module):
    """The deployed SimKD student: its backbone up to `layer`, the projector, the teacher's classifier.

    `head` is the teacher's real classifier module (frozen in offline mode), not a copy.
    """

    def __init__(
        self, backbone: nn.Module, layer: str, projector: nn.Module, head: nn.Module, size: tuple[int, int]
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.head = head
        self.layer = layer
        self.size = size  # the teacher map's size: a larger student map is pooled to it, as in training

    def forward(self, x: Tensor) -> Tensor:
        # A hook for this call only: the student's training forwards must not pay for it.
        tap = FeatureTap(self.backbone, [self.layer], "student")
        try:
            feature = tap(x).feats[self.layer]
        finally:
            tap.remove()
        if feature.shape[-2] > self.size[0] or feature.shape[-1] > self.size[1]:
            feature = F.adaptive_avg_pool2d(feature, self.size)
        projected = self.projector(feature)
        return self.head(F.adaptive_avg_pool2d(projected, 1).flatten(1))


class SimKD(Knowledge):
    """MSE between the projected student map and the teacher's map (CVPR 2022, Eq. 2).

    Args:
        factor: the projector's bottleneck reduction (2 in the paper's headline results).
        student_layers / teacher_layers: one layer each, the last feature maps ([last_stage]).
    """

    key = "simkd"

    def __init__(
        self,
        weight: float = 1.0,
        task_weight: float = 0.0,
        student_layers=("last_stage",),
        teacher_layers=("last_stage",),
        factor: int = 2,
        name: str | None = None,
    ):
        super().__init__(
            weight, task_weight, layer_list(student_layers), layer_list(teacher_layers), name=name
        )
        checked_number(factor, self.name, "factor", 2, minimum=1, strict=False)
        if int(factor) != factor:
            raise KdlabError(f"knowledge.{self.name}.factor={factor!r} must be a whole number, e.g. 2.")
        self.factor = int(factor)
        self.projector: SimKDProjector | None = None
        self.size: tuple[int, int] | None = None

    def _maps(self, student: Outputs, source: Outputs) -> tuple[Tensor, Tensor]:
        return student.feats[self.student_layers[0]], source.feats[self.teacher_layers[0]]

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise KdlabError(
                f"knowledge.{self.name} reads one layer of each model (the last feature maps, which feed the "
                f"teacher's classifier), got student_layers={list(self.student_layers)} and "
                f"teacher_layers={list(self.teacher_layers)}. Set both to [last_stage]."
            )
        s, t = self._maps(student, source)
        if s.ndim != 4 or t.ndim != 4:
            raise KdlabError(
                f"knowledge.{self.name} projects the student's last feature map onto the teacher's, so both "
                f"layers must give (batch, channels, height, width) maps; got {tuple(s.shape)} and "
                f"{tuple(t.shape)}. Set knowledge.{self.name}.student_layers/teacher_layers to [last_stage]."
            )
        head = classifier_of(source.model, f"knowledge.{self.name}")
        if any(p.requires_grad for p in head.parameters()):
            raise KdlabError(
                f"knowledge.{self.name} (SimKD) classifies the student with the teacher's classifier, which "
                "must stay fixed, but this scheme's source is still learning (peers in mode=online, the "
                "deepest "
                "exit in self-distillation). Use SimKD with a frozen teacher: mode=offline."
            )
        width = classifier_in_features(source.model, f"knowledge.{self.name}")
        if width != t.shape[1]:
            raise KdlabError(
                f"knowledge.{self.name}: the teacher's classifier reads {width} features, but its layer "
                f"'{self.teacher_layers[0]}' has {t.shape[1]} channels, so the projected student map "
                "could not "
                f"be classified by it. Set knowledge.{self.name}.teacher_layers to the layer its classifier "
                "reads after pooling ([last_stage] for kdlab's CNNs)."
            )
        self.projector = SimKDProjector(s.shape[1], t.shape[1], self.factor)
        self.size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s, t = pool_to_common_size(*self._maps(student, source))
        return F.mse_loss(self.projector(s), t.detach())

    def deployed_student(self, student: nn.Module, source: Outputs) -> nn.Module:
        return SimKDStudent(
            student, self.student_layers[0], self.projector, classifier_of(source.model), self.size
        )

    def deployed_description(self) -> str:
        return f"+ {self.name} projector + teacher's classifier"
