"""Sequence response losses (kdlab/knowledge/sequence.py): per-token divergences under a label mask.

Checked against values computed by hand on 3-token vocabularies, against TRL's GKD trainer's
generalized_jsd_loss (run once outside this repository on the same tensors), at JSD's limits, and
for the mask: what is at a position the labels do not count changes nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge.sequence import SequenceKD, sequence_divergence, token_divergence
from kdlab.taps import Outputs

P = [0.7, 0.2, 0.1]  # the teacher's next-token distribution at one position
Q = [0.5, 0.3, 0.2]  # the student's


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def divergence(name, **kwargs):
    log_q, log_p = torch.tensor(Q, dtype=torch.float64).log(), torch.tensor(P, dtype=torch.float64).log()
    return token_divergence(log_q, log_p, name, **kwargs).item()


@pytest.mark.parametrize(
    ("name", "kwargs", "by_hand"),
    [
        ("forward_kl", {}, kl(P, Q)),
        ("reverse_kl", {}, kl(Q, P)),
        ("jsd", {"beta": 0.5}, 0.5 * kl(P, mix(P, Q, 0.5)) + 0.5 * kl(Q, mix(P, Q, 0.5))),
        ("jsd", {"beta": 0.2}, 0.2 * kl(P, mix(P, Q, 0.2)) + 0.8 * kl(Q, mix(P, Q, 0.2))),
        ("jsd", {"beta": 0.0}, kl(P, Q)),
        ("jsd", {"beta": 1.0}, kl(Q, P)),
        ("skew_kl", {"alpha": 0.1}, kl(P, mix(P, Q, 0.1))),
        ("skew_reverse_kl", {"alpha": 0.1}, kl(Q, mix(P, Q, 0.9))),
    ],
)
def test_each_divergence_by_hand(name, kwargs, by_hand):
    assert divergence(name, **kwargs) == pytest.approx(by_hand, rel=1e-12)


def test_jsd_over_beta_tends_to_forward_kl_and_over_one_minus_beta_to_reverse_kl():
    # JSD(beta) itself vanishes at both ends; normalised, it reaches the two KLs GKD names it after.
    for beta in (1e-3, 1e-4):
        assert divergence("jsd", beta=beta) / beta == pytest.approx(kl(P, Q), rel=10 * beta)
        assert divergence("jsd", beta=1 - beta) / beta == pytest.approx(kl(Q, P), rel=10 * beta)


def test_skew_kl_tends_to_forward_kl_as_alpha_goes_to_zero():
    assert divergence("skew_kl", alpha=1e-6) == pytest.approx(kl(P, Q), rel=1e-5)
    assert divergence("skew_reverse_kl", alpha=1e-6) == pytest.approx(kl(Q, P), rel=1e-5)


# github:huggingface/trl GKDTrainer.generalized_jsd_loss (batchmean over the counted tokens), run on
# randn tensors from torch.Generator seed 0 (student [2,3,5], then teacher x 2) with LABELS.
TRL_REFERENCE = {
    0.0: 1.520239037540102,
    0.1: 0.1252708149882491,
    0.5: 0.32054360467003407,
    0.9: 0.1418569192117899,
    1.0: 2.131371248011573,
}
LABELS = torch.tensor([[1, 4, -100], [-100, 0, 2]])


def reference_tensors():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    assert student[0, 0, 0].item() == pytest.approx(-2.310411800234176)  # the draws TRL saw
    return student, teacher


@pytest.mark.parametrize("beta", sorted(TRL_REFERENCE))
def test_generalised_jsd_matches_trls_gkd_trainer(beta):
    student, teacher = reference_tensors()
    loss = sequence_divergence(student, teacher, LABELS, "jsd", beta=beta)
    assert loss.item() == pytest.approx(TRL_REFERENCE[beta], rel=1e-10)


def test_padding_and_prompt_positions_change_nothing():
    student, teacher = reference_tensors()
    before = sequence_divergence(student, teacher, LABELS, "reverse_kl")
    masked = LABELS == -100
    student2, teacher2 = student.clone(), teacher.clone()
    student2[masked] = torch.randn(int(masked.sum()), 5, dtype=torch.float64) * 10
    teacher2[masked] = -teacher2[masked]
    assert sequence_divergence(student2, teacher2, LABELS, "reverse_kl").item() == pytest.approx(
        before.item()
    )
    # The mean is over counted positions: the same tokens in a longer, padded batch give the same loss.
    padded = torch.cat([student, torch.zeros(2, 4, 5, dtype=torch.float64)], dim=1)
    padded_t = torch.cat([teacher, torch.ones(2, 4, 5, dtype=torch.float64)], dim=1)
    padded_labels = torch.cat([LABELS, torch.full((2, 4), -100)], dim=1)
    assert sequence_divergence(padded, padded_t, padded_labels, "reverse_kl").item() == pytest.approx(
        before.item()
    )


def test_no_counted_position_is_a_zero_that_still_backpropagates():
    student = torch.randn(1, 2, 4, requires_grad=True)
    loss = sequence_divergence(student, torch.randn(1, 2, 4), torch.full((1, 2), -100))
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_top_k_with_the_tail_by_hand_and_with_every_token_the_full_divergence():
    student = torch.tensor([[[1.0, 0.0, -1.0, 0.5]]], dtype=torch.float64)
    teacher = torch.tensor([[[2.0, 1.0, -3.0, 0.0]]], dtype=torch.float64)
    full = sequence_divergence(student, teacher, None, "forward_kl")
    assert sequence_divergence(student, teacher, None, "forward_kl", top_k=4).item() == pytest.approx(
        full.item()
    )
    p, q = teacher[0, 0].softmax(0).tolist(), student[0, 0].softmax(0).tolist()
    # k = 2: the teacher's tokens 0 and 1, and one bucket for tokens 2 and 3.
    p2, q2 = [p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]]
    assert sequence_divergence(student, teacher, None, "forward_kl", top_k=2).item() == pytest.approx(
        kl(p2, q2), rel=1e-12
    )


def test_temperature_scales_by_its_square():
    student, teacher = reference_tensors()
    at_t = sequence_divergence(student, teacher, LABELS, "forward_kl", temperature=2.0)
    by_hand = sequence_divergence(student / 2, teacher / 2, LABELS, "forward_kl") * 4
    assert at_t.item() == pytest.approx(by_hand.item(), rel=1e-12)


def test_the_knowledge_reads_logits_and_labels_and_trains_only_the_student():
    student, teacher = reference_tensors()
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    term = SequenceKD(divergence="jsd", beta=0.5)
    loss = term(Outputs(student), Outputs(teacher), {"target": LABELS})
    assert loss.item() == pytest.approx(TRL_REFERENCE[0.5], rel=1e-10)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"divergence": "kl"}, r"knowledge.sequence_kd.divergence='kl' is not one kdlab computes"),
        ({"beta": 1.5}, r"beta=1.5 must lie in \[0, 1\]"),
        ({"alpha": 1.0}, r"alpha=1.0 in \(0, 1\)"),
        ({"top_k": 0}, r"knowledge.sequence_kd.top_k=0 must be a whole number >= 1"),
    ],
)
def test_bad_settings_name_the_key(options, message):
    with pytest.raises(KdlabError, match=message):
        SequenceKD(**options)
