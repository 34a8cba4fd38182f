"""Curriculum temperature for KD (CTKD): a learnable temperature that makes distillation harder over time.

Li et al. 2023, "Curriculum Temperature for Knowledge Distillation" (AAAI). The temperature is
an adapter of the loss, optimised with the student, but through a gradient reversal layer: its
gradient is multiplied by lambda <= 0, so it moves to *increase* the KD loss while the student
moves to decrease it (the adversarial game of Sec. 3.2). lambda follows a cosine curriculum over
the first epochs (Sec. 3.3), so the task gets harder gradually.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.knowledge.response import standardized
from kdlab.taps import Outputs

MODES = ("global", "instance")


class GradientReversal(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by `scale` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class CTKD(Knowledge):
    """Li et al. 2023, "Curriculum Temperature for Knowledge Distillation" (AAAI), Sec. 3.

    KD (Hinton et al.) with a learned temperature T = t_start + t_range * sigmoid(theta):
    - `mode: global`: one parameter theta for every sample (initialised at 1, as in the reference);
    - `mode: instance`: theta per sample, from a 2-layer MLP on both models' detached logits.
    theta reaches the loss through a gradient reversal layer whose scale is lambda(epoch), a cosine
    ramp from `lambda_max` at the first epoch to `lambda_min` after `curriculum_epochs` epochs
    (lambda = lambda_min + (lambda_max - lambda_min) * (cos(pi * e / E) + 1) / 2, with e the 1-based
    epoch capped at E, as the reference code computes it). `curriculum_epochs: null` spans the whole
    run (the context's max_epochs). The loss is KL(softmax(t/T) || softmax(s/T)) * T^2 averaged over
    the batch, per sample in instance mode. `logit_standardization: true` z-scores the logits
    first (Sun et al. 2024).

    Defaults are the reference CIFAR recipe (CTKD's scripts: t_start 1, t_end 20, cosine decay from
    0 to -1 over 10 epochs, KD weight 0.9 and CE 0.1); `current_temperature()` reads the learned
    global temperature. The instance-wise module's width (`hidden`) is kdlab's choice.
    """

    key = "ctkd"

    def __init__(
        self,
        mode: str = "global",
        t_start: float = 1.0,
        t_range: float = 20.0,
        lambda_max: float = 0.0,
        lambda_min: float = -1.0,
        curriculum_epochs: int | None = 10,
        hidden: int = 128,
        logit_standardization: bool = False,
        weight: float = 0.9,
        task_weight: float = 0.1,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        if mode not in MODES:
            raise KdlabError(
                f"knowledge.{self.name}.mode={mode!r} is not one of {', '.join(MODES)}: 'global' learns one "
                f"temperature, 'instance' one per sample. Set knowledge.{self.name}.mode=global."
            )
        self.mode = mode
        self.t_start = checked_number(t_start, self.name, "t_start", 1, why="the lowest temperature")
        self.t_range = checked_number(t_range, self.name, "t_range", 20, strict=False)
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        if curriculum_epochs is not None:
            checked_number(curriculum_epochs, self.name, "curriculum_epochs", 10, why="the ramp's length")
        self.curriculum_epochs = curriculum_epochs
        self.hidden = int(hidden)
        self.logit_standardization = bool(logit_standardization)

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        if self.mode == "global":
            self.theta = nn.Parameter(torch.ones(1))
        else:
            classes = student.logits.shape[1]
            self.temperature_net = nn.Sequential(
                nn.Linear(2 * classes, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)
            )

    def curriculum(self, context: LossContext | None) -> float:
        """lambda for this epoch: the gradient reversal's scale (Sec. 3.3)."""
        if context is None:
            raise KdlabError(
                f"knowledge.{self.name} (CTKD) follows a curriculum over the epochs, so it needs the run's "
                "epoch, but forward() got no context. Pass context=LossContext(epoch=..., max_epochs=...)."
            )
        loops = self.curriculum_epochs if self.curriculum_epochs is not None else context.max_epochs
        if not loops or loops < 1:
            raise KdlabError(
                f"knowledge.{self.name}.curriculum_epochs=null spans the run's epochs, but the run has no "
                f"epoch limit. Set knowledge.{self.name}.curriculum_epochs to a number, e.g. 10."
            )
        epoch = min(context.epoch + 1, int(loops))  # the reference counts epochs from 1
        ramp = (math.cos(epoch * math.pi / loops) + 1.0) / 2.0
        return self.lambda_min + (self.lambda_max - self.lambda_min) * ramp

    def temperature(self, s: Tensor, t: Tensor, scale: float) -> Tensor:
        """T: shape (1,) in global mode, (B, 1) per sample in instance mode."""
        if self.mode == "global":
            theta = self.theta
        else:
            theta = self.temperature_net(torch.cat([t.detach(), s.detach()], dim=1).to(self.hidden_dtype()))
        theta = GradientReversal.apply(theta.to(s.dtype), scale)
        return self.t_start + self.t_range * torch.sigmoid(theta)

    def hidden_dtype(self) -> torch.dtype:
        return next(self.temperature_net.parameters()).dtype

    @torch.no_grad()
    def current_temperature(self) -> float | None:
        """The global temperature now (None in instance mode, where it depends on the sample)."""
        if self.mode != "global" or not hasattr(self, "theta"):
            return None
        return float(self.t_start + self.t_range * torch.sigmoid(self.theta))

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s, t = student.logits, source.logits.detach()
        if self.logit_standardization:
            s, t = standardized(s), standardized(t)
        T = self.temperature(s, t, self.curriculum(context))
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(dim=1)
        return (kl * T.view(-1) ** 2).mean()
