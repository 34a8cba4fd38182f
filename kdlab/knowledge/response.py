"""Response-based knowledge: what the teacher says about every class (its logits)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.knowledge.base import Knowledge, LossContext, checked_number, linear_warmup
from kdlab.taps import Outputs


class KD(Knowledge):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Sec. 2.

    Soft targets are a temperature softmax, q_i = exp(z_i/T) / sum_j exp(z_j/T) (Eq. 1), and
    the loss is T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch
    ("batchmean": summed over classes, then divided by the batch size). The T^2 factor keeps
    the gradient scale independent of T (Sec. 2.1). Defaults are the CRD benchmark recipe:
    T=4, weight 0.9, task (cross-entropy) weight 0.1.

    `logit_standardization: true` z-scores both models' logits per sample first (`standardized`;
    Sun et al. 2024, "Logit Standardization in Knowledge Distillation"), so the student matches the
    teacher's ranking of the classes, not the magnitude of its logits; the `ls` config holds that
    paper's recipe.
    """

    key = "kd"

    def __init__(
        self,
        temperature: float = 4.0,
        weight: float = 0.9,
        task_weight: float = 0.1,
        logit_standardization: bool = False,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        self.temperature = checked_number(
            temperature, self.name, "temperature", 4, why="it divides the logits"
        )
        self.logit_standardization = bool(logit_standardization)

    def soft_targets(self, logits: Tensor) -> Tensor:
        """softmax(logits / T): the teacher's soft targets at this temperature."""
        return F.softmax(logits / self.temperature, dim=1)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s, t = student.logits, source.logits
        if self.logit_standardization:
            s, t = standardized(s), standardized(t)
        log_q = F.log_softmax(s / self.temperature, dim=1)
        kl = F.kl_div(log_q, self.soft_targets(t), reduction="batchmean")
        return kl * self.temperature**2


def standardized(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each sample's logits z-scored, (z - mean(z)) / (std(z) + eps), before the temperature softmax.

    Sun et al. 2024, "Logit Standardization in Knowledge Distillation" (CVPR), Sec. 3.3: the
    Z-score function Z(z) that replaces z in softmax(z / T), making the soft targets invariant to a
    shift and a positive scaling of each sample's logits. The standard deviation has Bessel's
    correction and eps is added to it, as in the authors' code (commit f6e5aa5, `normalize`).
    """
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


class DKD(Knowledge):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation", Eq. 5-6.

    KD splits into target-class KD (TCKD: KL between the binary distributions [p_target, 1 - p_target]
    of teacher and student) and non-target-class KD (NCKD: KL between the distributions over the
    non-target classes alone, renormalised); KD = TCKD + (1 - p_target^teacher) * NCKD. DKD weights
    them freely: alpha * TCKD + beta * NCKD, both at temperature T and scaled by T^2, averaged over
    the batch. The loss ramps up linearly over the first `warmup_epochs` epochs, so it needs the
    run's epoch: `forward`'s `context` (kdlab.knowledge.LossContext). Defaults are the paper's
    CIFAR-100 recipe (mdistiller): alpha 1, beta 8, T 4, warm-up 20 epochs, cross-entropy weight 1.
    `logit_standardization: true` z-scores the logits first, as for KD (Sun et al. 2024; their DKD
    recipe: T 2, alpha and beta times 9, i.e. knowledge.dkd.weight=9).
    """

    key = "dkd"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        weight: float = 1.0,
        task_weight: float = 1.0,
        logit_standardization: bool = False,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        self.logit_standardization = bool(logit_standardization)
        self.temperature = checked_number(
            temperature, self.name, "temperature", 4, why="it divides the logits"
        )
        self.alpha, self.beta = float(alpha), float(beta)
        self.warmup_epochs = int(warmup_epochs)

    def warmup_factor(self, context: LossContext | None) -> float:
        return linear_warmup(context, self.warmup_epochs, self.name, "DKD")

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s, t, T = student.logits, source.logits, self.temperature
        if self.logit_standardization:  # Sun et al. 2024, as for KD (`standardized`)
            s, t = standardized(s), standardized(t)
        s, t = s / T, t / T
        target = F.one_hot(batch["target"], s.shape[1]).bool()
        tckd = F.kl_div(binary_log_probs(s, target), binary_log_probs(t, target).exp(), reduction="batchmean")
        # Non-target classes only, renormalised over the rest by the softmax.
        s_rest, t_rest = non_target(s, target), non_target(t, target)
        nckd = F.kl_div(F.log_softmax(s_rest, dim=1), F.softmax(t_rest, dim=1), reduction="batchmean")
        return self.warmup_factor(context) * (self.alpha * tckd + self.beta * nckd) * T**2


def non_target(logits: Tensor, target: Tensor) -> Tensor:
    """Each row without its target class's column: (B, C-1). `target` is the (B, C) one-hot mask."""
    return logits[~target].view(logits.shape[0], logits.shape[1] - 1)


def binary_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] per sample, computed stably in log space."""
    log_p = F.log_softmax(logits, dim=1)
    log_target = log_p.masked_fill(~target, float("-inf")).logsumexp(dim=1)
    log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_rest], dim=1)


class DIST(Knowledge):
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher", Eq. 6-8.

    Matches relations rather than exact probabilities: with Y = softmax(logits / tau), the
    inter-class loss is 1 - mean_i pearson(Y_s[i, :], Y_t[i, :]) (each sample's ranking of the
    classes) and the intra-class loss is 1 - mean_j pearson(Y_s[:, j], Y_t[:, j]) (each class's
    scores across the batch); loss = tau^2 * (beta * inter + gamma * intra). The class defaults
    are the reference implementation's ImageNet setting (beta = gamma = tau = 1); conf/knowledge/dist.yaml
    holds the authors' CIFAR recipe (tau = 4, weight 2).
    """

    key = "dist"

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        weight: float = 1.0,
        task_weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        self.temperature = checked_number(
            temperature, self.name, "temperature", 1, why="it divides the logits"
        )
        self.beta, self.gamma = float(beta), float(gamma)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        y_s = F.softmax(student.logits / self.temperature, dim=1)
        y_t = F.softmax(source.logits / self.temperature, dim=1)
        inter = 1 - pearson(y_s, y_t, dim=1).mean()
        intra = 1 - pearson(y_s, y_t, dim=0).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)


class NKD(Knowledge):
    """Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
    Approach with Normalized Loss and Customized Soft Labels" (ICCV), Sec. 3, the normalized KD loss.

    KD's loss splits into a target term and a non-target term whose scale shrinks with the teacher's
    target probability; NKD normalises the non-target part. With p = softmax at T=1 and, over the
    non-target classes alone, p~ = softmax(z / T) renormalised among them:

        L = -p_t^teacher * log p_t^student - gamma * T^2 * sum_{i != t} p~_i^teacher * log p~_i^student

    averaged over the batch (the second term is a cross-entropy, the teacher's entropy included, as
    in the authors' code). Defaults are the authors' (github.com/yzd-v/cls_KD, commit 1e5d48f,
    NKDLoss): T=1, gamma 1.5, weight 1, cross-entropy weight 1.
    """

    key = "nkd"

    def __init__(
        self,
        temperature: float = 1.0,
        gamma: float = 1.5,
        weight: float = 1.0,
        task_weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        self.temperature = checked_number(
            temperature, self.name, "temperature", 1, why="it divides the logits"
        )
        self.gamma = checked_number(gamma, self.name, "gamma", 1.5, strict=False)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s, t, T = student.logits, source.logits.detach(), self.temperature
        target = batch["target"].view(-1, 1)
        p_t = F.softmax(t, dim=1).gather(1, target)
        log_p_s = F.log_softmax(s, dim=1).gather(1, target)
        target_term = -(p_t * log_p_s).mean()
        # The non-target classes alone, renormalised over the rest by the softmax.
        mask = F.one_hot(batch["target"], s.shape[1]).bool()
        s_rest, t_rest = non_target(s, mask), non_target(t, mask)
        cross = (F.softmax(t_rest / T, dim=1) * F.log_softmax(s_rest / T, dim=1)).sum(dim=1).mean()
        return target_term - self.gamma * T**2 * cross


def pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of a and b along `dim` (the cosine similarity of the centred vectors)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return F.cosine_similarity(a, b, dim=dim, eps=eps)
