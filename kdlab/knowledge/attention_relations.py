"""MiniLM's self-attention relations, for transformers of different widths and head counts.

Wang, Wei, Dong, Bao, Yang and Zhou 2020, "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers" (NeurIPS), Sec. 3.1: the student mimics the
teacher's attention distributions and its *value relation*, softmax(V Vᵀ / √d). Its successor MiniLMv2
(Wang et al. 2021, Findings of ACL, Eq. 3-5) generalises both to relations between queries, between keys
and between values, computed over a number of *relation heads* that the teacher and the student share
whatever their own head counts: each model's Q (or K, V), of width C, is split into R heads of width
C / R, and

    R_x = softmax(X_r X_rᵀ / √(C / R))   for each relation head r,

compared by KL(R_teacher || R_student) row by row, averaged over the relation heads, the rows that count
and the batch. So a 12-head, 768-wide teacher teaches a 4-head, 256-wide student.

For a causal language model each position relates only to itself and the positions before it (the
relation is the same causal softmax its attention takes), and rows at positions that do not count
(padding: the labels' -100) are left out. A bidirectional model (MiniLM's BERT) passes `causal=False`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import KdlabError


def relation_log_probs(
    x: Tensor, relation_heads: int, causal: bool = True, counted: Tensor | None = None
) -> Tensor:
    """log softmax(X_r X_rᵀ / √d_r) of `x` `[B, T, C]` over `relation_heads` heads: `[B, R, T, T]`.

    Column j of row i is left out (probability 0) where j comes after i (`causal`) or position j does not
    count (`counted[b, j]` false). A row left with no column (a padding row) is uniform: callers drop it.
    """
    batch, length, width = x.shape
    if width % relation_heads:
        raise KdlabError(
            f"A feature of width {width} does not split into {relation_heads} relation heads: choose a "
            "number of relation heads that divides both models' widths (e.g. their greatest common divisor)."
        )
    heads = x.reshape(batch, length, relation_heads, width // relation_heads).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(width // relation_heads)
    hidden = torch.zeros(batch, 1, length, length, dtype=torch.bool, device=x.device)
    if causal:
        hidden = hidden | torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    if counted is not None:
        hidden = hidden | ~counted[:, None, None, :]
    empty = hidden.all(dim=-1, keepdim=True)
    scores = scores.masked_fill(hidden & ~empty, float("-inf")).masked_fill(empty, 0.0)
    return F.log_softmax(scores, dim=-1)


def relation_kl(
    student: Tensor,
    teacher: Tensor,
    relation_heads: int,
    counted: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """KL(R_teacher || R_student) of one relation (queries, keys or values), averaged over the relation
    heads, the counted rows (`counted`: `[B, T]` booleans, all when None) and the batch.

    Positions that do not count are dropped from the rows and from the columns alike, so padding
    changes nothing.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise KdlabError(
            f"The student's relation input {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} "
            "cover different batches or sequence lengths: both models must read the same tokens."
        )
    if counted is None:
        counted = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    log_s = relation_log_probs(student, relation_heads, causal, counted)
    log_t = relation_log_probs(teacher, relation_heads, causal, counted)
    p_t = log_t.exp()
    keep = (p_t > 0) & counted[:, None, :, None]
    per_entry = torch.where(keep, p_t * (log_t - log_s), torch.zeros_like(p_t))
    rows = counted.sum() * relation_heads
    return per_entry.sum() / rows.clamp(min=1)
