"""MiniLM's self-attention relations (kdlab/knowledge/attention_relations.py): by hand, across widths
and head counts, causal, and under padding."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge.attention_relations import relation_kl, relation_log_probs


def softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def test_one_relation_head_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)

    def relation(x):
        rows = x[0].tolist()
        return [
            softmax([sum(a * b for a, b in zip(ri, rj, strict=True)) / math.sqrt(2) for rj in rows])
            for ri in rows
        ]

    rs, rt = relation(s), relation(t)
    by_hand = sum(pt * math.log(pt / ps) for i in range(2) for pt, ps in zip(rt[i], rs[i], strict=True)) / 2
    assert relation_kl(s, t, 1, causal=False).item() == pytest.approx(by_hand, rel=1e-12)
    # Causal: the first position relates to itself alone (KL 0), the second to both.
    causal = sum(pt * math.log(pt / ps) for pt, ps in zip(rt[1], rs[1], strict=True)) / 2
    assert relation_kl(s, t, 1, causal=True).item() == pytest.approx(causal, rel=1e-12)


def test_models_of_different_widths_and_head_counts_share_relation_heads():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 96, generator=g)
    loss = relation_kl(student, teacher, relation_heads=8)  # 4 and 12 channels a head
    assert loss.item() > 0 and torch.isfinite(loss)
    assert relation_kl(teacher, teacher, relation_heads=8).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_log_probs(student, 8).shape == (2, 8, 6, 6)


def test_padding_rows_and_columns_change_nothing_and_keep_gradients_finite():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    alone = relation_kl(student, teacher, 4)
    # The same tokens with two padding positions before and one after, whatever their features.
    pad = torch.randn(1, 2, 8, generator=g) * 9, torch.randn(1, 1, 8, generator=g) * 9
    pad_t = torch.randn(1, 2, 16, generator=g) * 9, torch.randn(1, 1, 16, generator=g) * 9
    padded_s = torch.cat([pad[0], student, pad[1]], dim=1).requires_grad_()
    padded_t = torch.cat([pad_t[0], teacher, pad_t[1]], dim=1)
    counted = torch.tensor([[False, False, True, True, True, True, True, False]])
    loss = relation_kl(padded_s, padded_t, 4, counted)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(padded_s.grad).all() and padded_s.grad[0, :2].abs().sum() == 0


def test_a_width_that_does_not_split_into_the_relation_heads_is_refused():
    with pytest.raises(KdlabError, match=r"width 10 does not split into 4 relation heads"):
        relation_kl(torch.randn(1, 3, 10), torch.randn(1, 3, 8), 4)
    with pytest.raises(KdlabError, match=r"different batches or sequence lengths"):
        relation_kl(torch.randn(1, 3, 8), torch.randn(1, 4, 8), 4)
