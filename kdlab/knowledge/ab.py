"""Activation boundaries (AB): the student first learns where the teacher's neurons switch on.

Heo, Lee, Yun and Choi 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons" (AAAI). Before the main fit, a stage trains the student's layers (and a 1x1
conv + BN connector per layer where the widths differ) so that the sign of each pre-ReLU response
matches the teacher's, with a margin; the main fit then trains the student on the task alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import LossContext, Stage, checked_epochs, checked_number
from kdlab.knowledge.ofd import Connector
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs

# The authors' CIFAR code and RepDistiller scale the summed, batch-averaged loss by 3/1000.
SCALE = 3e-3


def checked_lr(value: object, key: str) -> float | None:
    """None (the run's optimizer.lr) or a finite learning rate > 0."""
    if value is None:
        return None
    why = "the stage's learning rate; null uses optimizer.lr"
    return checked_number(value, key, "init_lr", 0.01, why=why)


def alternative_loss(s: Tensor, t: Tensor, margin: float) -> Tensor:
    """The paper's alternative (hinge-like) loss between a student map and the teacher's pre-ReLU map.

    sum over elements of (s + mu)^2 where the teacher is off (t <= 0) and s > -mu, plus (s - mu)^2
    where it is on (t > 0) and s <= mu: zero once the student is past the margin on the right side.
    """
    off = (t <= 0) & (s > -margin)
    on = (t > 0) & (s <= margin)
    return ((s + margin).pow(2) * off + (s - margin).pow(2) * on).sum()


class AB(LayerPairKnowledge):
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons" (AAAI): the alternative loss (the paper's differentiable stand-in for its
    activation transfer loss, which counts the neurons whose on/off state differs) through a connector.

    For layer pair i of n (pre-ReLU maps of both models), with the connector r_i (1x1 conv + BN
    from the student's width to the teacher's; none where the widths are equal) and margin mu:

        L_i = sum_j (r_i(s)_j + mu)^2 [t_j <= 0, r_i(s)_j > -mu] + (r_i(s)_j - mu)^2 [t_j > 0, r_i(s)_j <= mu]
        L_AB = 3/1000 * sum_i 2^(i - n + 1) L_i / batch size     (i from 0: the deepest pair weighs 1)

    The method is a stage, "init" (`init_epochs` epochs at `init_lr`, this loss alone, training the
    student's layers, its classifier excepted, and the connectors), then the main fit. As in the
    reference recipe (RepDistiller's train_student.py, `--distill abound`: its main-fit loss_kd is
    0, `-r 1 -a 0`), the main fit trains with cross-entropy alone: the default weight is 0. The
    term still reports L_AB through the connectors as the init stage left them (frozen, BatchNorm on
    its running statistics, as RepDistiller keeps them in eval mode), which shows how far the main
    fit moves the student from the teacher's boundaries; a positive weight also trains the student
    on it. KD in the main fit (the authors' CIFAR code) is knowledge=[ab,kd].

    The connectors are trained by the stage only (`stage_only_modules`): the main fit keeps them
    fixed, with their BatchNorm on its running statistics.

    Where kdlab differs from the references: RepDistiller's connector is a 1x1 conv with a bias + BN
    without the authors' initialisation; kdlab's is the authors' (no bias, He-normal by the output
    fan, BN scale 1 and shift 0). Both references use no connector on equal widths; so does kdlab.
    The authors' teacher runs in train mode (BatchNorm on batch statistics) during the init stage;
    kdlab's frozen teacher stays in eval mode, as RepDistiller's does. Maps of different spatial
    sizes are refused (RepDistiller would resample the student with a strided conv): the loss
    compares the two maps position by position.
    """

    key = "ab"

    def __init__(
        self,
        weight: float = 0.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages_preact",),
        teacher_layers: str | Sequence[str] = ("stages_preact",),
        margin: float = 1.0,
        init_epochs: int = 30,
        init_lr: float | None = None,
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        self.margin = checked_number(margin, self.name, "margin", 1.0)
        self.init_epochs = checked_epochs(init_epochs, self.name)
        self.init_lr = checked_lr(init_lr, self.name)
        self.connectors = nn.ModuleList()

    # --------------------------------------------------------------------------- building
    def maps(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        """(student map, detached teacher map) per pair: 4-D, of the same batch and spatial size."""
        feats = self.pairs(student, source)
        for index, (s, t) in enumerate(feats):
            s_name, t_name = self.student_layers[index], self.teacher_layers[index]
            for side, name, x in (("student", s_name, s), ("teacher", t_name, t)):
                if x.ndim != 4:
                    raise KdlabError(
                        f"knowledge.{self.name} (AB) matches pre-ReLU feature maps, (batch, channels, "
                        f"height, width), but the {side}'s layer '{name}' gives shape {tuple(x.shape)}. Set "
                        f"knowledge.{self.name}.{side}_layers to pre-activation stages, e.g. [stages_preact]."
                    )
            if s.shape[-2:] != t.shape[-2:]:
                raise KdlabError(
                    f"knowledge.{self.name} (AB) matches the student's and the teacher's responses position "
                    f"by position, but the student's '{s_name}' is {tuple(s.shape[-2:])} and the teacher's "
                    f"'{t_name}' {tuple(t.shape[-2:])} in height and width. Pair layers of equal spatial "
                    f"size (knowledge.{self.name}.student_layers / teacher_layers), or models whose stages "
                    "have the same resolutions (e.g. two CIFAR ResNets)."
                )
        return feats

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        connectors = []
        for s, t in self.maps(student, source):
            if s.shape[1] == t.shape[1]:  # equal widths: the student's own responses (both references)
                connectors.append(nn.Identity())
            else:
                connectors.append(Connector(s.shape[1], t.shape[1]).to(device=s.device, dtype=s.dtype))
        self.connectors = nn.ModuleList(connectors)

    # ------------------------------------------------------------------------------ loss
    def ab_loss(self, student: Outputs, source: Outputs) -> Tensor:
        feats = self.maps(student, source)
        if len(self.connectors) != len(feats):
            raise KdlabError(
                f"knowledge.{self.name} (AB) was built for {len(self.connectors)} layer pairs but is given "
                f"{len(feats)}. Call build() with outputs of the same layers before the first forward "
                "(a scheme does this)."
            )
        n = len(feats)
        loss = feats[0][0].new_zeros(())
        for i, ((s, t), connector) in enumerate(zip(feats, self.connectors, strict=True)):
            loss = loss + alternative_loss(connector(s), t, self.margin) * 2.0 ** (i - n + 1)
        return SCALE * loss / feats[0][0].shape[0]

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        # The main fit: the connectors as the init stage left them (fixed, in eval mode: RepDistiller's).
        return self.ab_loss(student, source)

    # ------------------------------------------------------------------- the init stage
    def stages(self) -> list[Stage]:
        return [Stage("init", epochs=self.init_epochs, trains_student=True, lr=self.init_lr)]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [self.connectors]

    def stage_only_modules(self) -> list[nn.Module]:
        return [self.connectors]

    def stage_loss(
        self,
        stage: str,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        return self.ab_loss(student, source)
