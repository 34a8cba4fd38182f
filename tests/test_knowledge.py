"""Knowledge losses against numbers computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge import KD
from kdlab.taps import Outputs


def out(logits) -> Outputs:
    return Outputs(torch.tensor(logits, dtype=torch.float64))


def test_soft_targets_match_the_seed_example():
    # The seed document: T=5 on logits [7,5,2,0,-4] gives 0.417 0.280 0.154 0.103 0.046.
    probs = KD(temperature=5).soft_targets(torch.tensor([[7.0, 5.0, 2.0, 0.0, -4.0]]))
    assert probs[0].tolist() == pytest.approx([0.417, 0.280, 0.154, 0.103, 0.046], abs=5e-4)


def test_higher_temperature_gives_softer_targets():
    logits = torch.tensor([[7.0, 5.0, 2.0, 0.0, -4.0]])
    peaks = [KD(temperature=t).soft_targets(logits).max().item() for t in (1, 2, 5, 20)]
    assert peaks == sorted(peaks, reverse=True)


def test_kd_loss_by_hand_at_t1():
    # Teacher [ln 3, 0] -> p = (3/4, 1/4); student [0, 0] -> q = (1/2, 1/2).
    # KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2).
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = KD(temperature=1)(out([[0.0, 0.0]]), out([[math.log(3), 0.0]]), {})
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_kd_loss_scales_by_t_squared_and_averages_over_the_batch():
    # At T=2 the teacher [2 ln 3, 0] gives the same p as above, so the loss is 4x the KL;
    # a second sample where student == teacher adds 0, and batchmean halves the sum.
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student = out([[0.0, 0.0], [1.0, -1.0]])
    teacher = out([[2 * math.log(3), 0.0], [1.0, -1.0]])
    loss = KD(temperature=2)(student, teacher, {})
    assert loss.item() == pytest.approx(4 * kl / 2, rel=1e-9)


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10, dtype=torch.float64)
    assert KD(temperature=4)(Outputs(logits), Outputs(logits.clone()), {}).item() == pytest.approx(
        0, abs=1e-12
    )


def test_kd_gradient_reaches_the_student_only():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    KD()(Outputs(student), Outputs(teacher).detach(), {}).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_non_positive_temperature_is_refused(temperature):
    with pytest.raises(KdlabError, match="temperature must be > 0"):
        KD(temperature=temperature)


def test_negative_weight_is_refused():
    with pytest.raises(KdlabError, match="weight"):
        KD(weight=-1)
