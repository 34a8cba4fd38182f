"""Response knowledge for sequences: divergences between per-token next-token distributions.

A causal language model's logits are `[B, T, V]`: at every position, a distribution over the next
token. Distillation compares the teacher's and the student's distribution at each position that
counts (a real token, and with a prompt a completion token), and averages over those positions.
The positions are given by the labels `[B, T]` in Hugging Face's convention: -100 marks a position
that does not count (padding, a prompt token). Every divergence here is summed over the vocabulary
and averaged over the counted positions, so padding and prompt positions change nothing.

With p the teacher's distribution and q the student's, both softmax(z / T):
- forward KL, KL(p || q): mass-covering (Hinton KD per token);
- reverse KL, KL(q || p): mode-seeking (MiniLLM, Gu et al., ICLR 2024, Eq. 1);
- generalised JSD(β) (GKD, Agarwal et al., ICLR 2024, Eq. 1):
  β KL(p || m) + (1 - β) KL(q || m) with m = β p + (1 - β) q. Its limits β → 0 and β → 1 vanish, so
  GKD (and TRL's trainer) define JSD(0) as forward KL and JSD(1) as reverse KL; so does kdlab;
- skew KL and skew reverse KL (DistiLLM, Ko et al., ICML 2024, Eq. 4 and 5):
  SKL_α = KL(p || α p + (1 - α) q) and SRKL_α = KL(q || (1 - α) p + α q), α = 0.1 in the paper.

Top-k: a teacher's stored outputs may be its k largest logits only (the teacher-output cache). Then
each distribution is its k probabilities plus one bucket holding the rest of its mass (for the
student: its probability outside the teacher's k tokens), and the divergences are taken over those
k + 1 outcomes. With k = V this is the full divergence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.data.text import IGNORE_INDEX
from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.taps import Outputs

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


def counted_positions(labels: Tensor | None, shape: torch.Size) -> Tensor:
    """The positions that count, `[B, T]` booleans: labels != -100 (every position without labels)."""
    if labels is None:
        return torch.ones(shape[:-1], dtype=torch.bool)
    return labels != IGNORE_INDEX


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position, summed over the last axis, from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b), computed in log space."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def token_divergence(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    divergence: str,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """One divergence per position (the last axis is the distribution), from log-probabilities."""
    log_q, log_p = student_log_probs, teacher_log_probs
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "skew_kl":
        return _kl(log_p, _mixture(log_p, log_q, alpha))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _mixture(log_q, log_p, alpha))
    raise ValueError(f"unknown divergence {divergence!r}; one of {', '.join(DIVERGENCES)}")


def top_k_with_tail(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_index: Tensor,
    teacher_logsumexp: Tensor | None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Both models' log-probabilities over the teacher's k tokens plus one tail bucket, `[..., k + 1]`.

    `teacher_logsumexp` is the log-normaliser of the teacher's full logits (at `temperature`), which a
    cache keeps beside the k logits; None treats the k tokens as all the teacher's mass (an empty tail).
    """
    log_q_all = F.log_softmax(student_logits / temperature, dim=-1)
    log_q_k = log_q_all.gather(-1, teacher_topk_index)
    log_q_tail = _log1mexp(torch.logsumexp(log_q_k, dim=-1))
    scaled = teacher_topk_logits / temperature
    normaliser = teacher_logsumexp if teacher_logsumexp is not None else torch.logsumexp(scaled, dim=-1)
    log_p_k = scaled - normaliser.unsqueeze(-1)
    log_p_tail = _log1mexp(torch.logsumexp(log_p_k, dim=-1))
    return (
        torch.cat([log_q_k, log_q_tail.unsqueeze(-1)], dim=-1),
        torch.cat([log_p_k, log_p_tail.unsqueeze(-1)], dim=-1),
    )


def _log1mexp(log_x: Tensor) -> Tensor:
    """log(1 - exp(log_x)) for log_x <= 0; -inf where x is 1 (no tail)."""
    log_x = log_x.clamp(max=0.0)
    return torch.where(log_x > -math.log(2), torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def sequence_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
) -> Tensor:
    """The mean over counted positions of the per-token divergence, times T² (as KD scales it).

    `student_logits` and `teacher_logits` are `[B, T, V]` for the same positions; `labels` `[B, T]`
    marks the positions that do not count with -100. With `top_k`, only the teacher's k largest
    logits are used, plus the tail (see the module docstring). No counted position: 0, with a graph.
    """
    mask = counted_positions(labels, student_logits.shape).to(student_logits.device)
    s, t = student_logits[mask], teacher_logits[mask]  # [N, V]: only the positions that count
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    if top_k is not None and top_k < s.shape[-1]:
        values, index = t.topk(top_k, dim=-1)
        normaliser = torch.logsumexp(t / temperature, dim=-1)
        log_q, log_p = top_k_with_tail(s, values, index, normaliser, temperature)
    else:
        log_q, log_p = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    per_token = token_divergence(log_q, log_p, divergence, beta, alpha)
    return per_token.mean() * temperature**2


class SequenceKD(Knowledge):
    """Response knowledge for language models: `sequence_divergence` between the student's and the
    source's per-token distributions, over the positions the labels count.

    Reads `Outputs.logits` of shape `[B, T, V]` and `batch["target"]`, the labels aligned with the
    logits (`target[b, t]` is the token `logits[b, t]` predicts; -100 where the position does not
    count). `divergence` is one of forward_kl, reverse_kl, jsd (with `beta`), skew_kl and
    skew_reverse_kl (with `alpha`); `top_k` reads only the teacher's k largest logits and the tail.
    """

    key = "sequence_kd"

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        top_k: int | None = None,
        weight: float = 1.0,
        task_weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        if divergence not in DIVERGENCES:
            raise KdlabError(
                f"knowledge.{self.name}.divergence={divergence!r} is not one kdlab computes: use one of "
                f"{', '.join(DIVERGENCES)} (jsd takes beta: 0 is forward KL, 1 reverse KL)."
            )
        self.divergence = divergence
        self.temperature = checked_number(
            temperature, self.name, "temperature", 1, why="it divides the logits"
        )
        self.beta = checked_number(beta, self.name, "beta", 0.5, strict=False)
        self.alpha = checked_number(alpha, self.name, "alpha", 0.1)
        if self.beta > 1 or self.alpha >= 1:
            raise KdlabError(
                f"knowledge.{self.name}: beta={beta} must lie in [0, 1] and alpha={alpha} in (0, 1): each "
                "weighs one distribution in a mixture of the two (GKD: beta 0.5; DistiLLM: alpha 0.1)."
            )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise KdlabError(
                f"knowledge.{self.name}.top_k={top_k!r} must be a whole number >= 1 (the teacher's largest "
                "logits kept), or null for the whole vocabulary."
            )
        self.top_k = top_k

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        return sequence_divergence(
            student.logits,
            source.logits.detach(),
            batch.get("target"),
            self.divergence,
            self.temperature,
            self.beta,
            self.alpha,
            self.top_k,
        )
