"""OFD: the BatchNorm margin and the partial L2 by hand, what the loss ignores, the reference code's
numbers, and the sources it cannot use."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.knowledge.ofd import OFD, margin_from_norm, partial_l2
from kdlab.models import create_model
from kdlab.schemes import Offline
from kdlab.taps import Outputs

STUDENT = ("s1", "s2", "s3")
TEACHER = ("t1", "t2", "t3")

# Reference values: mdistiller (github.com/megvii-research/mdistiller,
# commit a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/OFD.py: the margins
# OFD.__init__ takes from get_bn_before_relu(), OFD.ofd_loss with its ConnectorConvBN and feat_loss;
# FEAT_WEIGHT 1), run once in float64 on the seeded inputs of `case()` below, connector parameters
# filled from the same generator. On equal sizes the authors' code (github.com/clovaai/overhaul-distillation,
# commit 76344a84a7ce23c894f41a2e05b866c9b73fd85a, CIFAR-100/distiller.py: get_margin_from_BN,
# distillation_loss, divided by the batch) gives the same loss. The reference keeps its margins in
# float32, hence rtol 1e-5 rather than tighter.
REFERENCE = {
    1: {  # teacher maps the student's size
        "loss": 186.4234242725251,
        "student_grad_squares": [4.645886798981839, 17.27979399845593, 4.774639130314254],
        "connector0_grad_sum": -3.510048387681294,
        "student3_grad_0000": 0.371007944563757,
        "margins": [
            [-3.0, -1.496870994567871, -0.8473970293998718, -2.229950189590454, -1.258785367012024],
            [
                -1.2814514636993408,
                -0.22615647315979004,
                -1.232218623161316,
                -0.7376864552497864,
                -0.24059335887432098,
                -1.7429217100143433,
                -0.8500608205795288,
            ],
            [
                -0.5589892864227295,
                -1.9044358730316162,
                -0.06004319712519646,
                -0.8575528264045715,
                -0.9823617339134216,
                -0.8797738552093506,
                -2.3905234336853027,
                -0.5473783016204834,
                -2.6363353729248047,
            ],
        ],
    },
    2: {  # teacher maps twice the student's size: pooled down to it
        "loss": 104.88641940912123,
        "student_grad_squares": [0.5540311788977257, 3.139839320481892, 5.861104719069754],
        "connector0_grad_sum": -0.7262027372174475,
        "student3_grad_0000": -0.3990251951076565,
        "margins": [
            [-3.0, -0.09629268944263458, -0.16209864616394043, -0.2507282793521881, -0.1530875414609909],
            [
                -0.7937406301498413,
                -0.801358163356781,
                -0.6578713059425354,
                -1.131880760192871,
                -0.6751371622085571,
                -0.18889470398426056,
                -3.6438076496124268,
            ],
            [
                -1.594115972518921,
                -0.3420771062374115,
                -1.3302013874053955,
                -0.28595036268234253,
                -0.8573229312896729,
                -3.0375545024871826,
                -1.2258268594741821,
                -3.092212677001953,
                -0.640395998954773,
            ],
        ],
    },
}


class Norms(nn.Module):
    """A stand-in teacher: three BatchNorms named as the norm points of layers t1..t3."""

    def __init__(self, widths=(5, 7, 9)):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.norm_points = {name: f"bns.{i}" for i, name in enumerate(TEACHER[: len(widths)])}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def case(teacher_scale: int = 1) -> tuple[OFD, Outputs, Outputs, list[torch.Tensor]]:
    """Three pre-ReLU maps per model (student 4/6/8 channels at 8/4/2 px, teacher 5/7/9 at
    `teacher_scale` times that), the teacher's BatchNorms and every connector parameter drawn from
    one seeded generator, in the order the reference run drew them."""
    g = torch.Generator().manual_seed(0)
    s = [randn(g, *shape).requires_grad_() for shape in ((2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2))]
    k = teacher_scale
    t = [randn(g, 2, c, h * k, h * k) for c, h in ((5, 8), (7, 4), (9, 2))]
    teacher = Norms().double()
    with torch.no_grad():
        for bn in teacher.bns:
            bn.weight.copy_(randn(g, bn.num_features))
            bn.bias.copy_(randn(g, bn.num_features) * 1.5)
        teacher.bns[0].weight[0], teacher.bns[0].bias[0] = 1.0, 4.0  # negative mass 3e-5: -3 sigma
        teacher.bns[1].weight[1] = -0.7  # a negative scale: |gamma| is the standard deviation
    teacher.requires_grad_(False)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    student = Outputs(zeros, dict(zip(STUDENT, s, strict=True)))
    source = Outputs(zeros, dict(zip(TEACHER, t, strict=True)), model=teacher)
    loss = OFD(student_layers=STUDENT, teacher_layers=TEACHER)
    loss.build(student, source)
    loss.double()
    with torch.no_grad():
        for connector in loss.connectors:
            for p in connector.parameters():
                p.copy_(randn(g, *p.shape) * 0.5)
    return loss, student, source, s


def identity_connectors_(loss: OFD) -> None:
    """Identity 1x1 convs; BN in eval mode with running mean 0, var 1 and eps 0 is then exactly x."""
    for conv, bn in loss.connectors:
        with torch.no_grad():
            conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
        bn.eval()
        bn.eps = 0.0


# ------------------------------------------------------------------------- by hand
def test_margin_by_hand():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 0.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.0, 5.0, -1.5]))
    margin = margin_from_norm(bn)
    # N(0, 1): E[x | x < 0] = -phi(0) / Phi(0) = -sqrt(2 / pi); N(0, 4): twice that.
    assert margin[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-12)
    assert margin[1].item() == pytest.approx(-2 * math.sqrt(2 / math.pi), rel=1e-12)
    # N(5, 1): P(x < 0) = Phi(-5) < 1e-3, so -3 sigma; a zero scale is the constant -1.5 itself.
    assert margin[2].item() == -3.0
    assert margin[3].item() == pytest.approx(-1.5, rel=1e-9)
    # N(-1, 1): E[x | x < 0] = -1 - phi(1) / Phi(1).
    phi, Phi = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    with torch.no_grad():
        bn.bias[0] = -1.0
    assert margin_from_norm(bn)[0].item() == pytest.approx(-1 - phi / Phi, rel=1e-12)


def test_partial_l2_by_hand():
    # margin -0.8: teacher [-1, -3, -0.2, 2, 0.5] -> target max(t, m) = [-0.8, -0.8, -0.2, 2, 0.5].
    # student [-2, 1, -0.5, 3, 0]: position 0 (s <= target <= 0) and 2 (s <= target <= 0) are skipped;
    # 1: (1 + 0.8)^2 = 3.24; 3: (3 - 2)^2 = 1; 4: target > 0, so (0 - 0.5)^2 = 0.25 even though s < t.
    s = torch.tensor([[[[-2.0, 1.0, -0.5, 3.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[-1.0, -3.0, -0.2, 2.0, 0.5]]]], dtype=torch.float64)
    margin = torch.tensor(-0.8, dtype=torch.float64).view(1, 1, 1, 1)
    assert partial_l2(s, t, margin).item() == pytest.approx(3.24 + 1.0 + 0.25, rel=1e-12)
    # Summed over positions, averaged over the batch: a second, identical sample changes nothing.
    assert partial_l2(torch.cat([s, s]), torch.cat([t, t]), margin).item() == pytest.approx(4.49, rel=1e-12)


def test_layers_are_weighted_by_powers_of_two_towards_the_deepest():
    s1, t1 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s2, t2 = torch.randn(2, 5, 2, 2, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    teacher = Norms((3, 5)).double().requires_grad_(False)
    loss = OFD(student_layers=["s1", "s2"], teacher_layers=["t1", "t2"])
    student = Outputs(s1[:, 0, 0], {"s1": s1, "s2": s2})
    source = Outputs(s1[:, 0, 0], {"t1": t1, "t2": t2}, model=teacher)
    loss.build(student, source)
    loss.double()
    identity_connectors_(loss)
    m = -math.sqrt(2 / math.pi)  # default BatchNorm: N(0, 1)
    m = torch.tensor(m, dtype=torch.float64)
    by_hand = partial_l2(s1, t1, m) / 2 + partial_l2(s2, t2, m)
    assert loss(student, source, {}).item() == pytest.approx(by_hand.item(), rel=1e-12)


# ----------------------------------------------------------------- what the loss ignores
def test_no_loss_where_the_student_is_at_or_below_a_non_positive_target():
    t = 2 * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    teacher = Norms((3,)).double().requires_grad_(False)
    loss = OFD(student_layers=["s1"], teacher_layers=["t1"])
    loss.build(Outputs(t[:, 0, 0], {"s1": t}), Outputs(t[:, 0, 0], {"t1": t}, model=teacher))
    loss.double()
    identity_connectors_(loss)
    source = Outputs(t[:, 0, 0], {"t1": t}, model=teacher)
    target = torch.maximum(t, loss.margin0.view(1, -1, 1, 1))  # the margin ReLU of the teacher
    assert loss(Outputs(t[:, 0, 0], {"s1": target.clone()}), source, {}).item() == 0.0
    # Lowered wherever the target is <= 0: still zero, and no gradient there.
    lowered = torch.where(target <= 0, target - 1.0, target).requires_grad_()
    value = loss(Outputs(t[:, 0, 0], {"s1": lowered}), source, {})
    value.backward()
    assert value.item() == 0.0 and lowered.grad.abs().sum() == 0
    # Raised there instead, it counts: (s - target)^2 = 1 per non-positive position, over a batch of 2.
    raised = torch.where(target <= 0, target + 1.0, target)
    expected = (target <= 0).sum().item() / 2
    assert loss(Outputs(t[:, 0, 0], {"s1": raised}), source, {}).item() == pytest.approx(expected, rel=1e-12)


# -------------------------------------------------------------- the reference's numbers
@pytest.mark.parametrize("teacher_scale", [1, 2])
def test_margins_loss_and_gradients_match_mdistiller(teacher_scale):
    ref = REFERENCE[teacher_scale]
    loss, student, source, s = case(teacher_scale)
    for i, expected in enumerate(ref["margins"]):
        assert getattr(loss, f"margin{i}").tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    value = loss(student, source, {})
    value.backward()
    assert value.item() == pytest.approx(ref["loss"], rel=1e-5)
    assert [x.grad.pow(2).sum().item() for x in s] == pytest.approx(ref["student_grad_squares"], rel=1e-5)
    assert s[2].grad[0, 0, 0, 0].item() == pytest.approx(ref["student3_grad_0000"], rel=1e-5)
    assert loss.connectors[0][0].weight.grad.sum().item() == pytest.approx(
        ref["connector0_grad_sum"], rel=1e-5
    )


# ------------------------------------------------------------------ sources that move
def test_margins_follow_a_source_that_is_being_trained_and_stay_for_a_frozen_one():
    frozen_loss, student, source, _ = case()
    frozen = [m.clone() for m in frozen_loss.margins()]
    with torch.no_grad():
        source.model.bns[0].bias.add_(1.0)
    frozen_loss(student, source, {})
    assert all(torch.equal(a, b) for a, b in zip(frozen_loss.margins(), frozen, strict=True))
    # An online peer: its BatchNorm trains, so each step reads its margins afresh.
    peer = source.model.requires_grad_(True)
    live = OFD(student_layers=STUDENT, teacher_layers=TEACHER)
    live.build(student, source)
    with torch.no_grad():
        peer.bns[1].bias.sub_(2.0)
    live(student, source, {})
    assert torch.allclose(live.margin1, margin_from_norm(peer.bns[1]))
    assert not torch.allclose(live.margin1, frozen[1])


# -------------------------------------------------------------------------- errors
def test_sources_without_batchnorm_points_are_refused():
    x = torch.zeros(2, 4, 2, 2)
    student = Outputs(torch.zeros(2, 3), {"s1": x})
    loss = OFD(student_layers=["s1"], teacher_layers=["features.0"])
    # BYOT's exits, an ensemble: no model to read a BatchNorm from.
    with pytest.raises(KdlabError, match=r"knowledge\.ofd \(OFD\) .* source has no model of its own"):
        loss.build(student, Outputs(torch.zeros(2, 3), {"features.0": x}))
    # The tutorial nets have no BatchNorm at all.
    deepnn = create_model("deepnn", num_classes=10, in_channels=1, input_size=28)
    with pytest.raises(KdlabError, match=r"teacher \(DeepNN\) names none .* model@teacher=resnet32x4"):
        loss.build(student, Outputs(torch.zeros(2, 3), {"features.0": x}, model=deepnn))
    # Named by group, they are refused before any loss is built.
    with pytest.raises(KdlabError, match=r"teacher \(DeepNN\) has no pre-activation stage taps"):
        Offline(
            teacher=deepnn,
            student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"ofd": OFD()},
            num_samples=100,
        )


def test_layers_without_a_norm_point_and_vectors_are_refused():
    resnet = create_model("resnet8", num_classes=10, in_channels=1, input_size=28)
    x = torch.zeros(2, 16, 4, 4)
    student = Outputs(torch.zeros(2, 3), {"s1": x})
    loss = OFD(student_layers=["s1"], teacher_layers=["stage1"])  # post-ReLU: no BatchNorm is named
    with pytest.raises(KdlabError, match=r"BatchNorm before the source's layer 'stage1'.*stage1_preact"):
        loss.build(student, Outputs(torch.zeros(2, 3), {"stage1": x}, model=resnet))
    vectors = OFD(student_layers=["s1"], teacher_layers=["embedding"])
    with pytest.raises(KdlabError, match=r"teacher's layer 'embedding' gives shape \(2, 16\)"):
        vectors.build(student, Outputs(torch.zeros(2, 3), {"embedding": torch.zeros(2, 16)}, model=resnet))
