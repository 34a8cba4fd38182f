"""ReviewKD: the hierarchical context loss by hand, the review path's structure, the warm-up, and the
reference code's numbers."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge import LossContext
from kdlab.knowledge.reviewkd import ReviewKD, hierarchical_context_loss
from kdlab.models import create_model
from kdlab.schemes import Offline
from kdlab.taps import Outputs

STUDENT = ("s1", "s2", "s3", "s_emb")
TEACHER = ("t1", "t2", "t3", "t_emb")

# Reference values: mdistiller (github.com/megvii-research/mdistiller,
# commit a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/ReviewKD.py:
# ReviewKD.forward_train with its ABF and hcl_loss; REVIEWKD_WEIGHT 1, WARMUP_EPOCHS 20,
# STU_PREACT false, epoch=5), run once in float64 on the seeded inputs of `case()`
# below, with the ABF parameters filled from the same generator. The authors' ABF and hcl
# (github.com/dvlab-research/ReviewKD, commit cede6ea6387ae9b6127de0e561507177bf19c11e,
# CIFAR-100/model/reviewkd.py) give the same losses.
REFERENCE = {
    1: {  # teacher maps the student's size
        "loss_epoch5": 1.249882934969465,
        "student_grad_squares": [
            5.474836774597562e-06,
            0.00013747708399484206,
            0.00019896787889153966,
            1.3525949164572182e-08,
        ],
        "student1_grad_0000": -0.0001525299219943141,
        "student4_grad_01": 1.6396301385659427e-05,
        "deepest_reduce_grad_sum": -0.00023097088593013022,
        "shallowest_attention_bias_grad": [-0.0014314571445325362, 0.001519913345041245],
    },
    2: {  # teacher maps twice the student's size (ABF resizes its output: OUT_SHAPES != SHAPES)
        "loss_epoch5": 1.199282158452929,
        "student_grad_squares": [
            7.164242812183907e-06,
            2.0758171580594994e-05,
            7.747876423218233e-05,
            1.930262317457333e-06,
        ],
        "student1_grad_0000": -5.597598683909486e-05,
        "student4_grad_01": 0.0005643150513998087,
        "deepest_reduce_grad_sum": 0.00043755247460434537,
        "shallowest_attention_bias_grad": [-0.0023650653665687645, 0.0019765555901177013],
    },
}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def case(teacher_scale: int = 1) -> tuple[ReviewKD, Outputs, Outputs, list[torch.Tensor]]:
    """Three stages and a pooled vector per model (student 4/6/8/8 channels at 8/4/2/- px, teacher
    5/7/9/9 at `teacher_scale` times that), and every ABF parameter drawn from one seeded generator."""
    g = torch.Generator().manual_seed(0)
    s = [randn(g, *shape).requires_grad_() for shape in ((2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2), (2, 8))]
    k = teacher_scale
    t = [
        randn(g, *shape)
        for shape in ((2, 5, 8 * k, 8 * k), (2, 7, 4 * k, 4 * k), (2, 9, 2 * k, 2 * k), (2, 9))
    ]
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    student, source = (
        Outputs(zeros, dict(zip(STUDENT, s, strict=True))),
        Outputs(zeros, dict(zip(TEACHER, t, strict=True))),
    )
    loss = ReviewKD(student_layers=STUDENT, teacher_layers=TEACHER)
    loss.build(student, source)
    loss.double()
    with torch.no_grad():
        for fusion in loss.fusions:  # shallow to deep, parameters in the reference's order
            for p in fusion.parameters():
                p.copy_(randn(g, *p.shape) * 0.5)
    return loss, student, source, s


# ------------------------------------------------------------------------- by hand
def test_hierarchical_context_loss_by_hand_on_a_4x4_map():
    # s = 0..15 in a 4x4 map, t = 0. Full MSE: mean k^2 = 1240/16 = 77.5. The 4x4 pool is skipped (not
    # smaller than the map); 2x2 block means 2.5, 4.5, 10.5, 12.5 -> MSE 293/4 = 73.25, weight 1/2;
    # 1x1 mean 7.5 -> 56.25, weight 1/4. HCL = (77.5 + 73.25/2 + 56.25/4) / (1 + 1/2 + 1/4).
    s = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    expected = (77.5 + 73.25 / 2 + 56.25 / 4) / 1.75
    assert hierarchical_context_loss(s, torch.zeros_like(s)).item() == pytest.approx(expected, rel=1e-12)
    # A 1x1 map has no pyramid: plain MSE.
    one = torch.tensor([[[[3.0]], [[1.0]]]], dtype=torch.float64)
    assert hierarchical_context_loss(one, torch.zeros_like(one)).item() == pytest.approx(5.0)


def test_one_level_is_the_hcl_of_the_abf_output_times_the_warm_up():
    s, t = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 6, 4, 4, dtype=torch.float64)
    loss = ReviewKD(student_layers=["a"], teacher_layers=["b"])
    student, source = Outputs(s[:, :1, 0, 0], {"a": s}), Outputs(t[:, :1, 0, 0], {"b": t})
    loss.build(student, source)
    loss.double()
    fusion = loss.fusions[0]
    assert fusion.attention is None and fusion.reduce[0].out_channels == 4  # min(512, 4) mid channels
    by_hand = hierarchical_context_loss(fusion.output(fusion.reduce(s)), t)
    value = loss(student, source, {}, LossContext(epoch=9))
    assert value.item() == pytest.approx(10 / 20 * by_hand.item(), rel=1e-12)


def test_the_warm_up_is_linear_over_20_epochs_counted_from_1():
    loss = ReviewKD()
    factors = [loss.warmup_factor(LossContext(epoch=e)) for e in (0, 4, 18, 19, 100)]
    assert factors == pytest.approx([1 / 20, 5 / 20, 19 / 20, 1.0, 1.0])
    assert ReviewKD(warmup_epochs=0).warmup_factor(None) == 1.0


# ------------------------------------------------------------------- the review path
def test_each_level_reviews_only_the_student_levels_at_or_below_it():
    loss, student, source, s = case()
    feats = loss.maps(student, source)
    base = [u.detach() for u in loss.reviewed(feats)]
    # Perturb the shallowest student level (not by a constant, which the BatchNorms would remove): the
    # deeper outputs do not move, the shallowest does.
    g = torch.Generator().manual_seed(7)  # seeded: the result must not depend on earlier tests' draws
    noise = torch.randn(feats[0][0].shape, generator=g, dtype=feats[0][0].dtype)
    shallow = [(feats[0][0] + noise, feats[0][1]), *feats[1:]]
    moved = loss.reviewed(shallow)
    assert not torch.allclose(moved[0], base[0])
    for u, b in zip(moved[1:], base[1:], strict=True):
        assert torch.equal(u.detach(), b)
    # Perturb the deepest (the pooled vector): every level moves. Its fusion normalises over a batch of
    # 1x1 maps, which a small shift may leave unchanged; a sign flip reorders every channel.
    deep = [*feats[:-1], (-3 * feats[-1][0], feats[-1][1])]
    assert all(not torch.allclose(u, b) for u, b in zip(loss.reviewed(deep), base, strict=True))
    # Each output has the teacher's shape.
    assert [tuple(u.shape) for u in base] == [tuple(t.shape) for _, t in feats]


def test_hcl_is_zero_only_for_equal_maps_and_the_teacher_gets_no_gradient():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert hierarchical_context_loss(x, x.clone()).item() == 0.0
    assert hierarchical_context_loss(x, x + 0.1).item() > 0
    loss, student, source, _ = case()
    teacher = source.feats["t1"].requires_grad_()
    loss(student, source, {}, LossContext(epoch=0)).backward()
    assert teacher.grad is None


# -------------------------------------------------------------- the reference's numbers
@pytest.mark.parametrize("teacher_scale", [1, 2])
def test_loss_and_gradients_match_mdistiller(teacher_scale):
    ref = REFERENCE[teacher_scale]
    loss, student, source, s = case(teacher_scale)
    value = loss(student, source, {}, LossContext(epoch=4))  # mdistiller's epoch 5 (1-based)
    value.backward()
    assert value.item() == pytest.approx(ref["loss_epoch5"], rel=1e-5)
    assert [x.grad.pow(2).sum().item() for x in s] == pytest.approx(ref["student_grad_squares"], rel=1e-5)
    assert s[0].grad[0, 0, 0, 0].item() == pytest.approx(ref["student1_grad_0000"], rel=1e-5)
    assert s[3].grad[0, 1].item() == pytest.approx(ref["student4_grad_01"], rel=1e-5)
    deepest, shallowest = loss.fusions[-1], loss.fusions[0]
    assert deepest.reduce[0].weight.grad.sum().item() == pytest.approx(
        ref["deepest_reduce_grad_sum"], rel=1e-5
    )
    assert shallowest.attention[0].bias.grad.tolist() == pytest.approx(
        ref["shallowest_attention_bias_grad"], rel=1e-5
    )


# -------------------------------------------------------------------------- errors
def test_bad_settings_and_a_missing_context_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge\.reviewkd\.warmup_epochs=-1: .* whole number >= 0"):
        ReviewKD(warmup_epochs=-1)
    with pytest.raises(KdlabError, match=r"knowledge\.reviewkd\.max_mid_channels=0"):
        ReviewKD(max_mid_channels=0)
    loss, student, source, _ = case()
    with pytest.raises(KdlabError, match=r"knowledge\.reviewkd \(ReviewKD\) ramps its loss .* no context"):
        loss(student, source, {})
    tokens = ReviewKD(student_layers=["a"], teacher_layers=["b"])
    # Tokens that are no patch grid (kdlab/knowledge/layouts.py; a grid would become a map).
    with pytest.raises(KdlabError, match=r"The student's 'a' is a sequence of 7 tokens of width 8"):
        tokens.build(
            Outputs(torch.zeros(2, 3), {"a": torch.zeros(2, 7, 8)}),
            Outputs(torch.zeros(2, 3), {"b": torch.zeros(2, 4, 2, 2)}),
        )


def test_a_teacher_without_pre_activation_taps_is_refused():
    # The tutorial nets have no BatchNorm and no stage<k>_preact tap points.
    with pytest.raises(KdlabError, match=r"teacher \(DeepNN\) has no pre-activation stage taps"):
        Offline(
            teacher=create_model("deepnn", num_classes=10, in_channels=1, input_size=28),
            student=create_model("lightnn", num_classes=10, in_channels=1, input_size=28),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"reviewkd": ReviewKD()},
            num_samples=100,
        )
