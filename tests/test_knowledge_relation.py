"""Relation-based knowledge losses against numbers worked out by hand from the papers' formulas."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.build import build_knowledge
from kdlab.errors import KdlabError
from kdlab.knowledge.relation import CC, FSP, PKT, RKD, SP
from kdlab.models import create_model
from kdlab.schemes import Offline
from kdlab.taps import Outputs
from tests.conftest import compose_config

DTYPE = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def outs(**feats) -> Outputs:
    """Outputs carrying only features (relation losses never read the logits)."""
    return Outputs(torch.zeros(1), feats)


def loss_of(term, s, t_, layer="embedding"):
    term.build(outs(**{layer: s}), outs(**{layer: t_}))
    return term(outs(**{layer: s}), outs(**{layer: t_}), {})


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


# ------------------------------------------------------------------------------- RKD
# Teacher: the 3-4-5 right triangle; student: the unit right isosceles triangle.
TEACHER_TRIANGLE = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
STUDENT_TRIANGLE = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_rkd_distance_term_by_hand():
    # Teacher distances 3, 4, 5 (mean 4) -> 0.75, 1, 1.25.
    # Student distances 1, 1, sqrt2 (mean (2 + sqrt2)/3) -> 3/(2+sqrt2), 3/(2+sqrt2), 3 sqrt2/(2+sqrt2).
    mu = (2 + math.sqrt(2)) / 3
    student_psi = [1 / mu, 1 / mu, math.sqrt(2) / mu]
    teacher_psi = [0.75, 1.0, 1.25]
    # Each unordered pair appears twice among the 3 x 3 ordered pairs; the diagonal adds 0.
    expected = 2 * sum(huber(s - t_) for s, t_ in zip(student_psi, teacher_psi, strict=True)) / 9
    loss = loss_of(RKD(distance_weight=1, angle_weight=0), t(STUDENT_TRIANGLE), t(TEACHER_TRIANGLE))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_rkd_angle_term_by_hand():
    # Cosines at each vertex: teacher 0 (right angle), 9/15 = 0.6, 16/20 = 0.8; student 0, 1/sqrt2,
    # 1/sqrt2. Of the 27 ordered triplets, each vertex has 2 proper ones (i, k and k, i); the rest
    # are degenerate and equal on both sides.
    diffs = [0.0, 1 / math.sqrt(2) - 0.6, 1 / math.sqrt(2) - 0.8]
    expected = 2 * sum(huber(d) for d in diffs) / 27
    loss = loss_of(RKD(distance_weight=0, angle_weight=1), t(STUDENT_TRIANGLE), t(TEACHER_TRIANGLE))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_rkd_weights_the_two_terms_25_and_50_by_default():
    s, t_ = t(STUDENT_TRIANGLE), t(TEACHER_TRIANGLE)
    distance = loss_of(RKD(distance_weight=1, angle_weight=0), s, t_)
    angle = loss_of(RKD(distance_weight=0, angle_weight=1), s, t_)
    assert loss_of(RKD(), s, t_).item() == pytest.approx(25 * distance.item() + 50 * angle.item(), rel=1e-9)
    assert RKD().weight == 1.0


def test_rkd_huber_is_linear_beyond_one():
    # 1-D: teacher points 0, 1, 2, 100 and student 0, 50, 99, 100; some normalised gaps differ by > 1.
    s, t_ = t([[0.0], [50.0], [99.0], [100.0]]), t([[0.0], [1.0], [2.0], [100.0]])
    ds, dt = torch.cdist(s, s), torch.cdist(t_, t_)
    off = ~torch.eye(4, dtype=torch.bool)
    gaps = ((ds / ds[off].mean() - dt / dt[off].mean())[off]).tolist()
    assert max(abs(g) for g in gaps) > 1
    expected = sum(huber(g) for g in gaps) / 16
    loss = loss_of(RKD(distance_weight=1, angle_weight=0), s, t_)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_rkd_is_invariant_to_scaling_the_features():
    torch.manual_seed(0)
    s, t_ = torch.randn(6, 5, dtype=DTYPE), torch.randn(6, 7, dtype=DTYPE)
    for weights in ({"angle_weight": 0}, {"distance_weight": 0}):
        base = loss_of(RKD(**weights), s, t_).item()
        assert base > 0
        assert loss_of(RKD(**weights), 7.5 * s, t_).item() == pytest.approx(base, rel=1e-9)
        assert loss_of(RKD(**weights), s, 0.01 * t_).item() == pytest.approx(base, rel=1e-9)


def test_rkd_batch_of_one_has_no_relations():
    assert loss_of(RKD(), torch.randn(1, 4), torch.randn(1, 8)).item() == 0.0


# -------------------------------------------------------------------------------- SP
def test_sp_by_hand_on_a_batch_of_two():
    # Student Q = [[1, 0], [1, 1]]: QQ^T = [[1, 1], [1, 2]], rows normalised below.
    # Teacher Q = [[1, 0, 0], [0, 1, 0]] (another width): QQ^T = I, already normalised.
    g_s = t([[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]])
    g_t = t([[1.0, 0.0], [0.0, 1.0]])
    expected = ((g_t - g_s) ** 2).sum().item() / 2**2
    s, t_ = t([[1.0, 0.0], [1.0, 1.0]]), t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(SP.similarity(s), g_s)
    assert loss_of(SP(), s, t_, "last_stage").item() == pytest.approx(expected, rel=1e-9)


def test_sp_sums_over_layer_pairs():
    torch.manual_seed(0)
    a_s, a_t, b_s, b_t = (torch.randn(4, 3, 2, 2, dtype=DTYPE) for _ in range(4))
    one = SP(student_layers=["a"], teacher_layers=["a"])
    two = SP(student_layers=["a", "b"], teacher_layers=["a", "b"])
    expected = one(outs(a=a_s), outs(a=a_t), {}) + one(outs(a=b_s), outs(a=b_t), {})
    assert two(outs(a=a_s, b=b_s), outs(a=a_t, b=b_t), {}).item() == pytest.approx(expected.item())


def test_sp_is_invariant_to_permuting_the_channels():
    torch.manual_seed(0)
    s, t_ = torch.randn(5, 6, 3, 3, dtype=DTYPE), torch.randn(5, 4, 3, 3, dtype=DTYPE)
    base = loss_of(SP(), s, t_, "last_stage").item()
    assert base > 0
    permuted = s[:, torch.randperm(6)]
    assert loss_of(SP(), permuted, t_, "last_stage").item() == pytest.approx(base, rel=1e-9)


# ------------------------------------------------------------------------------- PKT
def test_pkt_by_hand_on_two_vectors():
    # Student (1, 0), (0, 1): cosine 0 -> K = [[1, 1/2], [1/2, 1]] -> rows (2/3, 1/3).
    # Teacher (1, 0), (1, 1): cosine 1/sqrt2 -> k = (1 + 1/sqrt2)/2 -> rows (1, k)/(1 + k).
    k = (1 + 1 / math.sqrt(2)) / 2
    p_t, p_s = [1 / (1 + k), k / (1 + k)], [2 / 3, 1 / 3]
    # Both rows are the same distribution (up to order), so the mean over 4 entries is KL / 2.
    expected = sum(p * math.log(p / q) for p, q in zip(p_t, p_s, strict=True)) / 2
    loss = loss_of(PKT(), t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [1.0, 1.0]]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # eps = 1e-7 perturbs the ratio


def test_pkt_is_invariant_to_scaling_the_features():
    torch.manual_seed(0)
    s, t_ = torch.randn(5, 16, dtype=DTYPE), torch.randn(5, 64, dtype=DTYPE)
    base = loss_of(PKT(), s, t_).item()
    assert base > 0
    assert loss_of(PKT(), 10.0 * s, t_).item() == pytest.approx(base, rel=1e-5)
    assert loss_of(PKT(), s, 0.1 * t_).item() == pytest.approx(base, rel=1e-5)


# -------------------------------------------------------------------------------- CC
def identity_cc(**kwargs) -> CC:
    cc = CC(embed_dim=2, **kwargs)
    cc.build(outs(embedding=torch.zeros(2, 2, dtype=DTYPE)), outs(embedding=torch.zeros(2, 2, dtype=DTYPE)))
    with torch.no_grad():
        for linear in (*cc.student_embeds, *cc.teacher_embeds):
            linear.weight.copy_(torch.eye(2, dtype=DTYPE))
            linear.bias.zero_()
    return cc


def test_cc_by_hand_with_identity_embeddings():
    # gamma 0.4, P 2: k(c) = e^-0.8 (1 + 0.8 c + 0.32 c^2) for unit vectors at cosine c.
    # Student (1, 0), (0, 1): c = 0 off the diagonal; teacher (2, 0), (1, 1): c = 1/sqrt2.
    def kernel(c):
        return math.exp(-0.8) * (1 + 0.8 * c + 0.32 * c * c)

    expected = 2 * (kernel(1 / math.sqrt(2)) - kernel(0.0)) ** 2 / 4  # diagonals agree
    cc = identity_cc()
    loss = cc(outs(embedding=t([[1.0, 0.0], [0.0, 1.0]])), outs(embedding=t([[2.0, 0.0], [1.0, 1.0]])), {})
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_cc_taylor_kernel_converges_to_the_gaussian_rbf():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(4, 3, dtype=DTYPE), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(z, z) ** 2)
    assert torch.allclose(CC(order=20).correlation(z), exact, atol=1e-12)
    assert not torch.allclose(CC(order=2).correlation(z), exact, atol=1e-3)


def test_cc_embeds_both_sides_to_the_common_width():
    cc = CC()
    cc.build(outs(embedding=torch.zeros(2, 16, 1, 1)), outs(embedding=torch.zeros(2, 64, 1, 1)))
    assert cc.student_embeds[0].in_features == 16 and cc.teacher_embeds[0].in_features == 64
    assert cc.student_embeds[0].out_features == cc.teacher_embeds[0].out_features == 128


def test_cc_before_build_says_so():
    with pytest.raises(KdlabError, match="build"):
        CC()(outs(embedding=torch.zeros(2, 4)), outs(embedding=torch.zeros(2, 4)), {})


# ------------------------------------------------------------------------------- FSP
def test_fsp_by_hand_on_1x1x2x2_maps():
    # G = sum over the 4 positions of F1 * F2 / 4: student (1*1 + 4*1)/4 = 1.25, teacher 2/4 = 0.5.
    s1, s2 = t([[[[1.0, 2.0], [3.0, 4.0]]]]), t([[[[1.0, 0.0], [0.0, 1.0]]]])
    t1, t2 = t([[[[1.0, 1.0], [1.0, 1.0]]]]), t([[[[2.0, 0.0], [0.0, 0.0]]]])
    fsp = FSP(student_layers=["a", "b"], teacher_layers=["a", "b"])
    assert fsp.flow(s1, s2).item() == pytest.approx(1.25)
    assert fsp(outs(a=s1, b=s2), outs(a=t1, b=t2), {}).item() == pytest.approx((1.25 - 0.5) ** 2)


def test_fsp_pools_the_larger_map_and_sums_consecutive_pairs():
    # A third layer at 1 x 1: the 2 x 2 map before it is average-pooled to its mean.
    s1, s2, s3 = t([[[[1.0, 2.0], [3.0, 4.0]]]]), t([[[[1.0, 0.0], [0.0, 1.0]]]]), t([[[[3.0]]]])
    t1, t2, t3 = t([[[[1.0, 1.0], [1.0, 1.0]]]]), t([[[[2.0, 0.0], [0.0, 0.0]]]]), t([[[[1.0]]]])
    # (s2, s3): mean(s2) = 0.5 -> 1.5; (t2, t3): mean(t2) = 0.5 -> 0.5.
    expected = (1.25 - 0.5) ** 2 + (1.5 - 0.5) ** 2
    fsp = FSP(student_layers=["a", "b", "c"], teacher_layers=["a", "b", "c"])
    loss = fsp(outs(a=s1, b=s2, c=s3), outs(a=t1, b=t2, c=t3), {})
    assert loss.item() == pytest.approx(expected)


def test_fsp_width_mismatch_names_the_layers_to_change():
    fsp = FSP(student_layers=["a", "b"], teacher_layers=["a", "b"])
    student = outs(a=torch.zeros(2, 16, 4, 4), b=torch.zeros(2, 32, 2, 2))
    teacher = outs(a=torch.zeros(2, 16, 4, 4), b=torch.zeros(2, 64, 2, 2))
    with pytest.raises(KdlabError, match=r"student 'b' 32 vs teacher 'b' 64.*knowledge\.fsp\.student_layers"):
        fsp.build(student, teacher)


def test_fsp_needs_two_layers():
    fsp = FSP(student_layers=["a"], teacher_layers=["a"])
    with pytest.raises(KdlabError, match="at least two layers"):
        fsp.build(outs(a=torch.zeros(2, 4, 2, 2)), outs(a=torch.zeros(2, 4, 2, 2)))


# ---------------------------------------------------------------------- shared properties
def equal_cc(dim: int) -> CC:
    cc = CC(embed_dim=8)
    x = torch.zeros(2, dim, dtype=DTYPE)
    cc.build(outs(embedding=x), outs(embedding=x))
    cc.teacher_embeds.load_state_dict(cc.student_embeds.state_dict())
    return cc


@pytest.mark.parametrize(
    "make, shape",
    [
        (RKD, (6, 10)),
        (SP, (6, 4, 3, 3)),
        (PKT, (6, 10)),
        (lambda: equal_cc(10), (6, 10)),
        (lambda: FSP(student_layers=["a", "b"], teacher_layers=["a", "b"]), None),
    ],
    ids=["rkd", "sp", "pkt", "cc", "fsp"],
)
def test_loss_is_zero_when_student_equals_teacher(make, shape):
    torch.manual_seed(0)
    term = make()
    if shape is None:
        feats = {"a": torch.randn(3, 4, 4, 4, dtype=DTYPE), "b": torch.randn(3, 6, 2, 2, dtype=DTYPE)}
    else:
        feats = {"embedding": torch.randn(*shape, dtype=DTYPE)}
        feats["last_stage"] = feats["embedding"]
    student = outs(**feats)
    teacher = outs(**{k: v.clone() for k, v in feats.items()})
    term.build(student, teacher)
    assert term(student, teacher, {}).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("make", [RKD, SP, PKT, CC], ids=["rkd", "sp", "pkt", "cc"])
def test_different_widths_are_fine(make):
    torch.manual_seed(0)
    term = make(student_layers=["f"], teacher_layers=["f"])
    student, teacher = outs(f=torch.randn(8, 16)), outs(f=torch.randn(8, 64))
    term.build(student, teacher)
    loss = term(student, teacher, {})
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.parametrize("make", [RKD, SP, PKT, CC, FSP], ids=["rkd", "sp", "pkt", "cc", "fsp"])
def test_gradients_reach_the_student_and_cc_embeddings_never_the_source(make):
    torch.manual_seed(0)
    term = make(student_layers=["a", "b"], teacher_layers=["a", "b"])
    s = {"a": torch.randn(4, 3, 4, 4, requires_grad=True), "b": torch.randn(4, 5, 2, 2, requires_grad=True)}
    # The source is NOT detached here: the loss itself must not send gradient into it.
    src = {"a": torch.randn(4, 3, 4, 4, requires_grad=True), "b": torch.randn(4, 5, 2, 2, requires_grad=True)}
    term.build(outs(**s), outs(**src))
    term(outs(**s), outs(**src), {}).backward()
    for name in s:
        assert s[name].grad is not None and s[name].grad.abs().sum() > 0, name
        assert src[name].grad is None, name
    params = list(term.parameters())
    assert bool(params) == (make is CC)
    for p in params:  # CC: both sides' embeddings learn
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [RKD, SP, PKT, CC, FSP], ids=["rkd", "sp", "pkt", "cc", "fsp"])
def test_analytic_gradients_match_finite_differences(make):
    torch.manual_seed(0)
    src = {"a": torch.randn(3, 2, 2, 2, dtype=DTYPE), "b": torch.randn(3, 3, 1, 1, dtype=DTYPE)}
    term = make(student_layers=["a", "b"], teacher_layers=["a", "b"]).double()
    term.build(outs(**src), outs(**src))
    a = torch.randn(3, 2, 2, 2, dtype=DTYPE, requires_grad=True)
    b = torch.randn(3, 3, 1, 1, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: term(outs(a=a, b=b), outs(**src), {}), (a, b))


def test_unequal_numbers_of_layers_are_refused():
    with pytest.raises(KdlabError, match=r"knowledge\.sp\.student_layers and knowledge\.sp\.teacher_layers"):
        SP(student_layers=["a", "b"], teacher_layers=["a"]).build(
            outs(a=torch.zeros(2, 3), b=torch.zeros(2, 3)), outs(a=torch.zeros(2, 3))
        )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RKD(angle_weight=-1), "knowledge.rkd.angle_weight"),
        (lambda: PKT(eps=0), "knowledge.pkt.eps"),
        (lambda: CC(gamma=0), "knowledge.cc.gamma"),
        (lambda: CC(order=1.5), "knowledge.cc.order"),
        (lambda: SP(student_layers=[]), "knowledge.sp.student_layers"),
    ],
)
def test_bad_hyper_parameters_are_refused(make, match):
    with pytest.raises(KdlabError, match=match.replace(".", r"\.")):
        make()


def test_half_precision_features_are_compared_in_float32():
    torch.manual_seed(0)
    s, t_ = torch.randn(6, 8), torch.randn(6, 8)
    full = loss_of(PKT(), s, t_)
    half = loss_of(PKT(), s.bfloat16(), t_.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=0.05)


# --------------------------------------------------------------------------- configs
EXPECTED_CONFIGS = {
    "rkd": (RKD, 1.0, ("embedding",), {"distance_weight": 25.0, "angle_weight": 50.0}),
    "sp": (SP, 3000.0, ("last_stage",), {}),
    "cc": (CC, 0.02, ("embedding",), {"gamma": 0.4, "order": 2, "embed_dim": 128}),
    "pkt": (PKT, 30000.0, ("embedding",), {"eps": 1e-7}),
    "fsp": (FSP, 50.0, ("stages",), {}),
}


@pytest.mark.parametrize("name", [*EXPECTED_CONFIGS, "relation"])
def test_config_instantiates(name):
    knowledge = build_knowledge(compose_config([f"knowledge={name}"]))
    key = "rkd" if name == "relation" else name
    assert list(knowledge) == [key]
    cls, weight, layers, hyper = EXPECTED_CONFIGS[key]
    term = knowledge[key]
    assert type(term) is cls and term.weight == weight and term.task_weight == 1.0
    assert term.student_layers == layers and term.teacher_layers == layers
    for attribute, value in hyper.items():
        assert getattr(term, attribute) == pytest.approx(value), attribute


def test_configs_combine_in_a_list():
    knowledge = build_knowledge(compose_config(["knowledge=[rkd,sp,pkt]"]))
    assert [type(k) for k in knowledge.values()] == [RKD, SP, PKT]


# ---------------------------------------------------------------------------- schemes
def offline(term, teacher: str, student: str) -> Offline:
    def model(name):
        return create_model(name, num_classes=10, in_channels=1, input_size=28)

    return Offline(
        teacher=model(teacher),
        student=model(student),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={type(term).__name__.lower(): term},
    )


def one_step(scheme: Offline) -> None:
    """A training-style step on 4 random images: finite loss, gradient on the student."""
    torch.manual_seed(0)
    batch = {"input": torch.randn(4, 1, 28, 28), "target": torch.tensor([0, 1, 2, 3])}
    student = scheme.student_tap(batch["input"])
    terms = scheme.loss_terms(student, scheme.sources(batch["input"], batch), batch)
    loss = scheme.weighted_sum(terms)
    assert all(math.isfinite(v.item()) for v in terms.values()), terms
    loss.backward()
    assert all(p.grad is None for p in scheme.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme.student.parameters())


PAIRS = [("deepnn", "lightnn"), ("resnet8x4", "resnet8")]


@pytest.mark.parametrize("teacher, student", PAIRS, ids=["deepnn-lightnn", "resnet8x4-resnet8"])
@pytest.mark.parametrize("make", [RKD, SP, PKT, CC], ids=["rkd", "sp", "pkt", "cc"])
def test_offline_scheme_builds_and_steps(make, teacher, student):
    scheme = offline(make(), teacher, student)
    term = next(iter(scheme.knowledge.values()))
    assert scheme.task_weight == 1.0
    if make is SP:  # last_stage was expanded to each model's own deepest stage
        deepest = {"lightnn": "stage2", "resnet8": "stage3", "deepnn": "stage2", "resnet8x4": "stage3"}
        assert (term.student_layers, term.teacher_layers) == ((deepest[student],), (deepest[teacher],))
    else:
        assert term.student_layers == term.teacher_layers == ("embedding",)
    if make is CC:
        assert isinstance(term.student_embeds[0], nn.Linear)
        assert {id(p) for p in term.parameters()} <= {id(p) for p in scheme.trainable_parameters()}
    one_step(scheme)


def test_offline_fsp_on_a_same_width_pair():
    scheme = offline(FSP(), "resnet14", "resnet8")
    assert scheme.knowledge["fsp"].student_layers == ("stage1", "stage2", "stage3")
    one_step(scheme)


@pytest.mark.parametrize("teacher, student", PAIRS, ids=["deepnn-lightnn", "resnet8x4-resnet8"])
def test_offline_fsp_on_a_mismatched_pair_says_what_to_do(teacher, student):
    with pytest.raises(KdlabError, match=r"channel counts differ.*same-width pairs"):
        offline(FSP(), teacher, student)
