"""Feature-based knowledge losses against numbers computed by hand from the papers' formulas."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.build import build_knowledge
from kdlab.errors import KdlabError
from kdlab.knowledge.feature import AT, NST, VID, CosineHint, FitNet
from kdlab.models import create_model
from kdlab.schemes import Offline
from kdlab.taps import Outputs
from tests.conftest import compose_config

LOSSES = [FitNet, AT, NST, CosineHint, VID]


def outs(*feats: torch.Tensor, layers=("a",)) -> Outputs:
    """Outputs holding `feats` under the names `layers` (logits are not read by these losses)."""
    return Outputs(
        torch.zeros(feats[0].shape[0], 2, dtype=feats[0].dtype), dict(zip(layers, feats, strict=True))
    )


def built(loss, s: torch.Tensor, t: torch.Tensor):
    """`loss` on one layer pair "a", built from these features; returns the loss and its inputs."""
    student, source = outs(s), outs(t)
    loss.build(student, source)
    return loss, student, source


def one_pair(cls, **kwargs):
    return cls(student_layers=["a"], teacher_layers=["a"], **kwargs)


def identity_(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])


def identity_regressor_(fitnet: FitNet) -> None:
    """Identity conv; BN in eval mode with running mean 0, var 1 and eps 0 is then exactly x."""
    regressor = fitnet.regressors[0]
    identity_(regressor.conv)
    regressor.bn.eval()
    regressor.bn.eps = 0.0


# A 1x2x2x2 map: channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, -1], [0, 2]].
SMALL = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [0.0, 2.0]]]], dtype=torch.float64)


# ------------------------------------------------------------------------------------- AT
def test_at_by_hand_on_a_1x2x2x2_map():
    # mean_c F^2 per position: (1+0)/2, (4+1)/2, (9+0)/2, (16+4)/2 = 0.5, 2.5, 4.5, 10.
    q_s = [0.5, 2.5, 4.5, 10.0]
    n_s = math.sqrt(sum(v * v for v in q_s))
    # Teacher: all ones in both channels -> q = 1 everywhere -> normalised 1/2 everywhere.
    teacher = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    expected = sum((v / n_s - 0.5) ** 2 for v in q_s) / 4
    loss = one_pair(AT)(outs(SMALL), outs(teacher), {})
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_at_is_invariant_to_a_permutation_of_channels_and_zero_for_equal_maps():
    s, t = torch.randn(3, 6, 5, 5), torch.randn(3, 4, 5, 5)
    at = one_pair(AT)
    base = at(outs(s), outs(t), {})
    assert at(outs(s[:, torch.randperm(6)]), outs(t[:, torch.randperm(4)]), {}).item() == pytest.approx(
        base.item(), rel=1e-5
    )
    assert at(outs(s), outs(s.clone()), {}).item() == pytest.approx(0, abs=1e-12)


def test_at_pools_the_larger_map_and_sums_over_layer_pairs():
    s1, t1 = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)
    s2, t2 = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    pooled = one_pair(AT)(outs(torch.nn.functional.avg_pool2d(s1, 2)), outs(t1), {})
    assert one_pair(AT)(outs(s1), outs(t1), {}).item() == pytest.approx(pooled.item(), rel=1e-6)
    second = one_pair(AT)(outs(s2), outs(t2), {})
    two = dict(student_layers=["a", "b"], teacher_layers=["a", "b"])
    student, source = outs(s1, s2, layers=("a", "b")), outs(t1, t2, layers=("a", "b"))
    assert AT(**two)(student, source, {}).item() == pytest.approx((pooled + second).item(), rel=1e-6)
    mean = AT(layer_reduction="mean", **two)(student, source, {})
    assert mean.item() == pytest.approx((pooled + second).item() / 2, rel=1e-6)


def test_at_refuses_different_numbers_of_layers():
    at = AT(student_layers=["stage1", "stage2"], teacher_layers=["stage1", "stage2", "stage3"])
    x = torch.randn(2, 4, 4, 4)
    student = outs(x, x, layers=("stage1", "stage2"))
    source = outs(x, x, x, layers=("stage1", "stage2", "stage3"))
    with pytest.raises(
        KdlabError, match=r"knowledge\.at\.student_layers=\[stage1,stage2\].*=\[stage2,stage3\]"
    ):
        at.build(student, source)


def test_at_refuses_vectors_and_single_positions():
    with pytest.raises(KdlabError, match=r"shape \(2, 8\).*knowledge\.at\.student_layers"):
        built(one_pair(AT), torch.randn(2, 8), torch.randn(2, 8, 4, 4))
    with pytest.raises(KdlabError, match="single common position"):
        built(one_pair(AT), torch.randn(2, 8, 1, 1), torch.randn(2, 8, 4, 4))


# ------------------------------------------------------------------------------------ NST
def test_nst_mmd_by_hand_on_two_channels():
    # Student channels [3, 0] and [2, 2] -> unit vectors e1 and (1,1)/sqrt2; teacher [0, 5] and
    # [1, 1] -> e2 and (1,1)/sqrt2. With k(x,y) = (x.y)^2:
    #   k_ss = mean [[1, 1/2], [1/2, 1]] = 3/4, k_tt = 3/4, k_st = mean [[0, 1/2], [1/2, 1]] = 1/2.
    s = torch.tensor([[[[3.0, 0.0]], [[2.0, 2.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[0.0, 5.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    assert one_pair(NST)(outs(s), outs(t), {}).item() == pytest.approx(0.75 + 0.75 - 2 * 0.5, rel=1e-12)
    # With d = 1, c = 1 the kernel is x.y + 1: the +1 adds 1 to each of the three means and cancels
    # in k_ss + k_tt - 2 k_st, leaving the linear-kernel MMD ||mean_j s_j - mean_i t_i||^2.
    mean_s = (torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 1.0]) / math.sqrt(2)) / 2
    mean_t = (torch.tensor([0.0, 1.0]) + torch.tensor([1.0, 1.0]) / math.sqrt(2)) / 2
    linear = one_pair(NST, degree=1, c=1.0)(outs(s), outs(t), {})
    assert linear.item() == pytest.approx((mean_s - mean_t).pow(2).sum().item(), rel=1e-6)


def test_nst_is_zero_for_equal_maps_and_handles_channel_and_spatial_mismatch():
    s = torch.rand(2, 16, 8, 8)
    assert one_pair(NST)(outs(s), outs(s.clone()), {}).item() == pytest.approx(0, abs=1e-6)
    loss = one_pair(NST)(outs(s), outs(torch.rand(2, 32, 4, 4)), {})
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() >= 0


@pytest.mark.parametrize("kwargs", [{"degree": 0}, {"degree": 1.5}, {"c": -1.0}])
def test_nst_refuses_bad_kernels(kwargs):
    with pytest.raises(KdlabError, match="knowledge.nst"):
        NST(**kwargs)


# ---------------------------------------------------------------------------------- cosine
def test_cosine_on_vectors_with_known_angles():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # 45 and 0 degrees
    expected = ((1 - math.cos(math.pi / 4)) + 0) / 2
    assert one_pair(CosineHint)(outs(s), outs(t), {}).item() == pytest.approx(expected, rel=1e-12)
    assert one_pair(CosineHint)(outs(s), outs(s.clone()), {}).item() == pytest.approx(0, abs=1e-12)


def test_cosine_average_pools_a_longer_teacher_vector_as_the_tutorial_does():
    # Teacher [1, 3, 2, 2, 0, 4] pooled by 3 -> [2, 2]; the student [1, 0] makes 45 degrees with it.
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.0, 4.0]], dtype=torch.float64)
    loss, student, source = built(one_pair(CosineHint), s, t)
    assert loss(student, source, {}).item() == pytest.approx(1 - math.cos(math.pi / 4), rel=1e-12)
    # Maps are flattened first: 16x8x8 = 1024 student values, 32x8x8 = 2048 teacher values.
    loss, student, source = built(one_pair(CosineHint), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8))
    assert 0 <= loss(student, source, {}).item() <= 2


def test_cosine_refuses_lengths_that_are_not_multiples():
    with pytest.raises(KdlabError, match=r"'a' has 6 values.*'a' 8 .*not a multiple of 6"):
        built(one_pair(CosineHint), torch.randn(2, 6), torch.randn(2, 8))
    with pytest.raises(KdlabError, match="not a multiple"):  # a longer student cannot be pooled
        built(one_pair(CosineHint), torch.randn(2, 8), torch.randn(2, 4))


# ---------------------------------------------------------------------------------- FitNet
def test_fitnet_with_an_identity_regressor_is_the_plain_mse():
    s = torch.rand(2, 3, 4, 4, dtype=torch.float64)  # post-ReLU features: the ReLU keeps them
    t = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    fitnet, student, source = built(one_pair(FitNet), s, t)
    identity_regressor_(fitnet)
    assert fitnet(student, source, {}).item() == pytest.approx((s - t).pow(2).mean().item(), rel=1e-12)
    assert fitnet(student, outs(s.clone()), {}).item() == pytest.approx(0, abs=1e-15)


def test_fitnet_adapts_8x8x16_to_4x4x32_by_pooling_then_a_1x1_conv():
    # A constant student (1 everywhere) pools to 1; a conv of all 1/16 sums 16 channels to 1 in every
    # output channel; BN is the identity (eval, eps 0); so r(s) = 1 and the MSE to a zero teacher is 1.
    fitnet, student, source = built(one_pair(FitNet), torch.ones(2, 16, 8, 8), torch.zeros(2, 32, 4, 4))
    regressor = fitnet.regressors[0]
    assert regressor.conv.weight.shape == (32, 16, 1, 1) and regressor.conv.bias is None
    with torch.no_grad():
        regressor.conv.weight.fill_(1 / 16)
    regressor.bn.eval()
    regressor.bn.eps = 0.0
    assert fitnet(student, source, {}).item() == pytest.approx(1.0, rel=1e-6)
    # A smaller student map: the teacher's is pooled down instead (4x4 -> 2x2 of 2x2 means).
    t = torch.arange(16.0).view(1, 1, 4, 4)
    fitnet, student, source = built(one_pair(FitNet), torch.zeros(1, 1, 2, 2), t)
    fitnet.regressors[0].eval()
    expected = torch.tensor([2.5, 4.5, 10.5, 12.5]).pow(2).mean()
    assert fitnet(student, source, {}).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------- VID
def test_vid_by_hand_with_an_identity_regressor_and_known_variance():
    s = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    vid, student, source = built(one_pair(VID), s, t)
    regressor = vid.regressors[0]
    assert [m.weight.shape[:2] for m in regressor.mean if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3
    for conv in regressor.mean:
        if isinstance(conv, nn.Conv2d):
            identity_(conv)  # mu(s) = s for s >= 0 (the ReLUs keep it)
    with torch.no_grad():
        regressor.alpha.copy_(torch.tensor([0.0, 1.0]))
    var = [math.log1p(math.exp(a)) + 1e-5 for a in (0.0, 1.0)]
    terms = [
        0.5 * (math.log(var[c]) + (t[b, c, i, j] - s[b, c, i, j]).item() ** 2 / var[c])
        for b in range(2)
        for c in range(2)
        for i in range(3)
        for j in range(3)
    ]
    assert vid(student, source, {}).item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_vid_starts_at_the_reference_variance_and_adapts_widths_and_sizes():
    vid, student, source = built(one_pair(VID), torch.rand(2, 16, 8, 8), torch.rand(2, 32, 4, 4))
    regressor = vid.regressors[0]
    assert torch.allclose(regressor.variance(), torch.full((32,), 5.0))
    widths = [tuple(m.weight.shape[:2]) for m in regressor.mean if isinstance(m, nn.Conv2d)]
    assert widths == [(32, 16), (32, 32), (32, 32)]  # hidden width = the teacher's channels
    assert math.isfinite(vid(student, source, {}).item())
    narrow, _, _ = built(one_pair(VID, hidden_channels=8), torch.rand(2, 16, 8, 8), torch.rand(2, 32, 4, 4))
    assert narrow.regressors[0].mean[0].weight.shape[0] == 8


@pytest.mark.parametrize(
    "kwargs", [{"init_variance": 0}, {"eps": -1.0}, {"init_variance": 1e-6}, {"hidden_channels": 0}]
)
def test_vid_refuses_bad_hyper_parameters(kwargs):
    with pytest.raises(KdlabError, match="knowledge.vid"):
        VID(**kwargs)


@pytest.mark.parametrize(
    "make", [lambda: AT(p=0), lambda: FitNet(layer_reduction="max"), lambda: AT(student_layers=[])]
)
def test_bad_settings_are_refused(make):
    with pytest.raises(KdlabError, match="knowledge"):
        make()


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", LOSSES)
def test_gradients_reach_the_student_and_adapters_never_the_source(cls):
    s = torch.rand(2, 4, 4, 4, requires_grad=True)
    t = torch.rand(2, 8, 4, 4, requires_grad=True)  # not detached: the loss must cut it itself
    loss, student, source = built(one_pair(cls), s, t)
    loss(student, source, {}).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None for p in loss.parameters())
    if cls in (FitNet, VID):
        assert sum(p.numel() for p in loss.parameters()) > 0


# --------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name, cls, weight, task_weight",
    [
        ("fitnet", FitNet, 100.0, 1.0),
        ("at", AT, 1000.0, 1.0),
        ("nst", NST, 50.0, 1.0),
        ("cosine", CosineHint, 0.25, 0.75),
        ("vid", VID, 1.0, 1.0),
        ("feature", FitNet, 100.0, 1.0),
    ],
)
def test_each_config_instantiates_its_loss(name, cls, weight, task_weight):
    knowledge = build_knowledge(compose_config([f"knowledge={name}"]))
    [(key, loss)] = knowledge.items()
    assert key == (name if name != "feature" else "fitnet")
    assert type(loss) is cls and loss.weight == weight and loss.task_weight == task_weight


# --------------------------------------------------------------------------------- schemes
def offline(loss, teacher: str, student: str) -> Offline:
    return Offline(
        teacher=create_model(teacher, num_classes=10, in_channels=1, input_size=28),
        student=create_model(student, num_classes=10, in_channels=1, input_size=28),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={"feat": loss},
    )


@pytest.mark.parametrize(
    "teacher, student",
    [("deepnn", "lightnn"), ("resnet8x4", "resnet8"), ("resnet8", "resnet8x4")],
    ids=["tutorial", "wide-to-thin", "thin-to-wide"],
)
@pytest.mark.parametrize("cls", LOSSES)
def test_offline_scheme_builds_adapters_from_the_dry_forward_and_trains(cls, teacher, student):
    if cls is CosineHint and student == "resnet8x4":
        # 256x7x7 student values cannot be pooled out of 64x7x7 teacher values.
        with pytest.raises(KdlabError, match="12544 values.*3136.*not a multiple"):
            offline(cls(), teacher, student)
        return
    torch.manual_seed(0)
    scheme = offline(cls(), teacher, student)
    loss = scheme.knowledge["feat"]
    optimised = {id(p) for p in scheme.trainable_parameters()}
    assert all(id(p) in optimised for p in loss.parameters())
    if cls in (FitNet, VID):
        student_channels = [
            scheme.student_tap(torch.zeros(2, 1, 28, 28)).feats[n].shape[1] for n in loss.student_layers
        ]
        assert [r.mean[0].in_channels if cls is VID else r.conv.in_channels for r in loss.regressors] == (
            student_channels
        )
    batch = {"input": torch.randn(2, 1, 28, 28), "target": torch.randint(0, 10, (2,))}
    x = batch["input"]
    terms = scheme.loss_terms(scheme.student_tap(x), scheme.sources(x, batch), batch)
    scheme.weighted_sum(terms).backward()
    assert math.isfinite(terms["feat"].item())
    assert all(p.grad is not None for p in loss.parameters())
    assert all(p.grad is None for p in scheme.teacher.parameters())


def test_offline_scheme_refuses_layer_count_mismatch_with_a_clear_message():
    # resnet8 has three stages, LightNN two: "stages" cannot be paired one to one.
    with pytest.raises(
        KdlabError, match=r"student has 2 layer\(s\).*teacher 3.*knowledge\.nst\.teacher_layers"
    ):
        offline(NST(), "resnet8", "lightnn")
