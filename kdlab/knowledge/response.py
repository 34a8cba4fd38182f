"""Response-based knowledge: what the teacher says about every class (its logits)."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge
from kdlab.taps import Outputs


class KD(Knowledge):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Sec. 2.

    Soft targets are a temperature softmax, q_i = exp(z_i/T) / sum_j exp(z_j/T) (Eq. 1), and
    the loss is T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch
    ("batchmean": summed over classes, then divided by the batch size). The T^2 factor keeps
    the gradient scale independent of T (Sec. 2.1). Defaults are the CRD benchmark recipe:
    T=4, weight 0.9, task (cross-entropy) weight 0.1.
    """

    def __init__(self, temperature: float = 4.0, weight: float = 0.9, task_weight: float = 0.1):
        super().__init__(weight=weight, task_weight=task_weight)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise KdlabError(
                f"KD temperature must be > 0, got {temperature!r}: it divides the logits. "
                "Use e.g. knowledge.kd.temperature=4 (the CIFAR recipe) or 1 (plain softmax)."
            )
        self.temperature = float(temperature)

    def soft_targets(self, logits: Tensor) -> Tensor:
        """softmax(logits / T): the teacher's soft targets at this temperature."""
        return F.softmax(logits / self.temperature, dim=1)

    def forward(self, student: Outputs, source: Outputs, batch: Mapping[str, Tensor]) -> Tensor:
        log_q = F.log_softmax(student.logits / self.temperature, dim=1)
        kl = F.kl_div(log_q, self.soft_targets(source.logits), reduction="batchmean")
        return kl * self.temperature**2
