"""MLKD: the multi-level (instance, batch, class) alignment on a weak and a strong view, its confidence
masks and its logit-standardised variant, checked by hand and against the authors' code's numbers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kdlab.build import build_knowledge
from kdlab.errors import KdlabError
from kdlab.knowledge.mlkd import MLKD
from kdlab.models import create_model
from kdlab.schemes import BYOT, Offline, Online
from kdlab.taps import Outputs
from tests.conftest import compose_config, fast_overrides

# Inputs for the reference values: torch.Generator().manual_seed(0), randn(5, 6) in float64 times 2
# (student) or 3 (teacher), rounded to 3 decimals, drawn in the order weak student, weak teacher,
# strong student, strong teacher. An odd batch, so the sample mask keeps 3 of 5.
S_WEAK = [
    [-4.621, -0.747, -2.122, 1.999, -1.768, -2.551],
    [-1.246, -1.733, -2.591, 3.047, 0.647, 4.035],
    [2.271, -2.454, 1.04, -1.906, -0.183, 1.113],
    [-0.019, -2.435, -2.531, -2.239, -3.493, 2.082],
    [1.308, 0.296, -2.292, 3.746, -0.62, 0.48],
]
T_WEAK = [
    [1.107, -0.562, -9.436, -0.341, 5.089, -1.996],
    [-1.762, 8.496, -5.884, 0.663, -4.143, -6.164],
    [0.143, -1.157, -1.568, -1.776, -2.674, -1.34],
    [-2.104, 0.979, -2.622, 1.182, 1.143, -0.198],
    [-2.27, 1.106, -0.518, 2.925, 1.249, -1.496],
]
S_STRONG = [
    [2.219, 0.551, -1.375, -1.15, -1.184, 1.239],
    [-2.975, 2.725, 3.935, -0.083, -2.8, -0.474],
    [0.414, -0.235, -0.234, 3.106, -0.642, 3.124],
    [-0.407, 2.188, 0.107, 0.027, -0.659, 2.855],
    [0.205, -2.853, 1.666, 1.751, 0.526, -0.811],
]
T_STRONG = [
    [-0.329, 3.04, 0.159, -3.296, 3.939, 3.885],
    [0.28, -1.946, 3.555, 2.22, -1.558, -3.916],
    [1.857, -2.067, -0.116, -0.865, -0.792, 0.668],
    [-1.089, 1.639, 1.796, 1.142, 0.602, -3.412],
    [-0.965, 2.361, 3.872, -6.773, 3.0, 3.884],
]
TARGET = [0, 3, 1, 5, 2]

# Reference values: the authors' forward_train, run once on the inputs above in float64 with stub
# models that return them (the teacher's on both views), its losses_dict summed as its trainer does.
# - "mlkd": github.com/Jin-Ying/Multi-Level-Logit-Distillation, commit 5ee473f,
#   mdistiller/distillers/KD_ours.py KD_ours, cfg.KD: TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9.
# - "mlkd+ls": github.com/sunshangquan/logit-standardization-KD, commit f6e5aa5,
#   mdistiller/distillers/MLKD.py MLKD with LOGIT_STAND true, TEMPERATURE 2, KD_WEIGHT 9, CE 0.1.
# grad_*: the total's gradient with respect to the student's weak / strong logit [0, 0].
REFERENCE = {
    "mlkd": {
        "loss_ce": 0.6029105657087217,
        "loss_kd": 39.63023365776194,
        "loss_cc": 0.37223286582258797,
        "loss_bc": 0.13142480788801225,
        "total": 40.73680189718126,
        "grad_weak": -0.3702005299866995,
        "grad_strong": 0.3722695402865025,
    },
    "mlkd+ls": {
        "loss_ce": 0.6029105657087217,
        "loss_kd": 55.91593474095755,
        "loss_cc": 4.97512341129476,
        "loss_bc": 1.8280464611893363,
        "total": 63.32201517915037,
        "grad_weak": -0.060403096294694265,
        "grad_strong": 0.5632909928312816,
    },
}
LS_RECIPE = {"temperatures": [2, 3, 5, 2, 6], "strong_temperatures": [2, 3, 5], "weight": 9.0}


def tensor(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def pair(s_weak, t_weak, s_strong, t_strong):
    """Student and teacher Outputs with the strong view, as a scheme hands them to the loss."""
    return Outputs(s_weak, views={"strong": Outputs(s_strong)}), Outputs(
        t_weak, views={"strong": Outputs(t_strong)}
    )


@pytest.mark.parametrize("variant", list(REFERENCE))
def test_total_loss_and_gradients_match_the_authors_code(variant):
    mlkd = MLKD(**LS_RECIPE, logit_standardization=True) if variant == "mlkd+ls" else MLKD()
    ref = REFERENCE[variant]
    s_weak, s_strong = tensor(S_WEAK, grad=True), tensor(S_STRONG, grad=True)
    target = torch.tensor(TARGET)
    loss = mlkd(*pair(s_weak, tensor(T_WEAK), s_strong, tensor(T_STRONG)), {"target": target})
    # The scheme's total: the task loss on the weak view plus the weighted term.
    total = mlkd.task_weight * F.cross_entropy(s_weak, target) + mlkd.weight * loss
    total.backward()
    assert total.item() == pytest.approx(ref["total"], rel=1e-5)
    assert s_weak.grad[0, 0].item() == pytest.approx(ref["grad_weak"], rel=1e-5)
    assert s_strong.grad[0, 0].item() == pytest.approx(ref["grad_strong"], rel=1e-5)
    # Without the strong view's cross-entropy, weight x the term is the reference's three distillation losses.
    ls = variant == "mlkd+ls"
    alone = MLKD(**(LS_RECIPE if ls else {}), logit_standardization=ls, strong_task_weight=0.0)
    value = alone(*pair(tensor(S_WEAK), tensor(T_WEAK), tensor(S_STRONG), tensor(T_STRONG)), {})
    assert alone.weight * value.item() == pytest.approx(
        ref["loss_kd"] + ref["loss_cc"] + ref["loss_bc"], rel=1e-5
    )


@pytest.mark.parametrize("variant", list(REFERENCE))
def test_each_level_matches_the_authors_code(variant):
    from kdlab.knowledge.mlkd import batch_loss, class_loss, instance_loss
    from kdlab.knowledge.response import standardized

    recipe = LS_RECIPE if variant == "mlkd+ls" else {}
    mlkd = MLKD(**recipe)
    ref = REFERENCE[variant]
    sw, tw, ss, ts = map(tensor, (S_WEAK, T_WEAK, S_STRONG, T_STRONG))
    sample_share, class_share = mlkd.mask_shares(tw)
    assert (sample_share.item(), class_share.item()) == (pytest.approx(3 / 5), pytest.approx(3 / 6))
    w = mlkd.weight
    cc = sum(class_share * class_loss(sw, tw, T) for T in mlkd.temperatures)
    bc = sum(sample_share * batch_loss(sw, tw, T) for T in mlkd.temperatures)
    assert w * cc.item() == pytest.approx(ref["loss_cc"], rel=1e-5)
    assert w * bc.item() == pytest.approx(ref["loss_bc"], rel=1e-5)
    if variant == "mlkd+ls":
        sw, tw, ss, ts = map(standardized, (sw, tw, ss, ts))
    kd = sum(sample_share * instance_loss(sw, tw, T) for T in mlkd.temperatures)
    kd = kd + sum(instance_loss(ss, ts, T) for T in mlkd.strong_temperatures)
    kd = kd + sum(instance_loss(sw, tw, T) for T in mlkd.weak_unmasked_temperatures)
    assert w * kd.item() == pytest.approx(ref["loss_kd"], rel=1e-5)
    target = torch.tensor(TARGET)
    ce = 0.1 * (F.cross_entropy(tensor(S_WEAK), target) + F.cross_entropy(tensor(S_STRONG), target))
    assert ce.item() == pytest.approx(ref["loss_ce"], rel=1e-5)


def test_one_temperature_by_hand():
    # Student: uniform predictions. Teacher: [3/4, 1/4] and [1/2, 1/2]. T = 1, no strong terms.
    s = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    mlkd = MLKD(temperatures=[1], strong_temperatures=[], weak_unmasked_temperatures=[], strong_task_weight=0)
    # Confidences 3/4 and 1/2, median 5/8: one sample of two kept. Class sums 5/4 and 3/4, median 1:
    # one class of two kept. Each mask is the share it keeps: 1/2.
    kl = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) / 2  # the second sample adds 0
    # Gram matrices: teacher [[5/8, 1/2], [1/2, 1/2]], student all 1/2: ||.||^2 = (1/8)^2, over B = 2.
    gram = (1 / 8) ** 2 / 2
    # Class correlations: teacher [[13/16, 7/16], [7/16, 5/16]], student all 1/2, over C = 2.
    corr = ((5 / 16) ** 2 + 2 * (1 / 16) ** 2 + (3 / 16) ** 2) / 2
    expected = 0.5 * kl + 0.5 * gram + 0.5 * corr
    assert mlkd(*pair(s, t, s, t), {}).item() == pytest.approx(expected, rel=1e-12)


def test_the_strong_view_terms_by_hand():
    sw, tw, ss, ts = map(tensor, (S_WEAK, T_WEAK, S_STRONG, T_STRONG))
    target = torch.tensor(TARGET)
    base = dict(temperatures=[1], weak_unmasked_temperatures=[], strong_task_weight=0)
    without = MLKD(**base, strong_temperatures=[])(*pair(sw, tw, ss, ts), {}).item()
    # The strong view's instance term at T = 2, written out: T^2 * mean over samples of KL(p_t || p_s).
    p_t, log_p_s = (ts / 2).softmax(1), (ss / 2).log_softmax(1)
    kd_strong = 4 * (p_t * (p_t.log() - log_p_s)).sum(1).mean().item()
    with_strong = MLKD(**base, strong_temperatures=[2])(*pair(sw, tw, ss, ts), {}).item()
    assert with_strong - without == pytest.approx(kd_strong, rel=1e-9)
    # The strong view's cross-entropy enters as strong_task_weight / weight, so weight x term adds 0.1 x CE.
    ce = -(ss.log_softmax(1).gather(1, target[:, None])).mean().item()
    mlkd = MLKD(**{**base, "strong_task_weight": 0.1}, strong_temperatures=[], weight=0.9)
    added = mlkd(*pair(sw, tw, ss, ts), {"target": target}).item() - without
    assert 0.9 * added == pytest.approx(0.1 * ce, rel=1e-9)


def test_zero_when_the_student_predicts_as_the_teacher_and_invariant_to_logit_shifts():
    tw, ts = tensor(T_WEAK), tensor(T_STRONG)
    for ls in (False, True):
        mlkd = MLKD(strong_task_weight=0, logit_standardization=ls)
        assert mlkd(*pair(tw.clone(), tw, ts.clone(), ts), {}).item() == pytest.approx(0.0, abs=1e-12)
    # Softmax ignores a per-sample shift of the logits, so every level and both masks do too.
    mlkd = MLKD(strong_task_weight=0)
    sw, ss = tensor(S_WEAK), tensor(S_STRONG)
    shift = torch.tensor([[1.0], [-3.0], [7.5], [0.0], [2.0]], dtype=torch.float64)
    base = mlkd(*pair(sw, tw, ss, ts), {}).item()
    assert mlkd(*pair(sw + shift, tw - shift, ss - shift, ts + shift), {}).item() == pytest.approx(
        base, rel=1e-9
    )


def test_logit_standardisation_makes_the_instance_terms_scale_invariant():
    from kdlab.knowledge.mlkd import batch_loss, class_loss

    # Only the instance level is standardised (as in Sun et al.'s MLKD), so only it ignores a per-sample
    # scaling of the logits: the loss less its batch and class levels (on raw logits) is invariant.
    def instance_part(sw, tw, ss, ts, ls=True):
        mlkd = MLKD(strong_task_weight=0, logit_standardization=ls)
        share, class_share = mlkd.mask_shares(tw)
        raw = sum(
            share * batch_loss(sw, tw, T) + class_share * class_loss(sw, tw, T) for T in mlkd.temperatures
        )
        return (mlkd(*pair(sw, tw, ss, ts), {}) - raw).item()

    scale = torch.tensor([[0.5], [3.0], [7.0], [1.5], [2.0]], dtype=torch.float64)
    sw, tw, ss, ts = map(tensor, (S_WEAK, T_WEAK, S_STRONG, T_STRONG))
    base = instance_part(sw, tw, ss, ts)
    # (up to the eps added to the standard deviation)
    assert instance_part(sw * scale, tw / scale, ss / scale, ts * scale) == pytest.approx(base, rel=1e-6)
    raw = instance_part(sw, tw, ss, ts, ls=False)
    assert instance_part(sw * scale, tw / scale, ss / scale, ts * scale, ls=False) != pytest.approx(raw)


def test_no_gradient_reaches_the_teacher():
    sw, ss = tensor(S_WEAK, grad=True), tensor(S_STRONG, grad=True)
    tw, ts = tensor(T_WEAK, grad=True), tensor(T_STRONG, grad=True)
    MLKD()(*pair(sw, tw, ss, ts), {"target": torch.tensor(TARGET)}).backward()
    assert tw.grad is None and ts.grad is None
    assert sw.grad.abs().sum() > 0 and ss.grad.abs().sum() > 0


def test_a_loss_without_the_strong_view_is_explained():
    s, t = tensor(S_WEAK), tensor(T_WEAK)
    with_view = Outputs(s, views={"strong": Outputs(s)})
    for student, source, side in [
        (Outputs(s), Outputs(t, views={"strong": Outputs(t)}), "student"),
        (with_view, Outputs(t), "teacher"),
    ]:
        with pytest.raises(
            KdlabError, match=rf"knowledge.mlkd \(MLKD\) .* the {side}'s outputs carry no 'strong'"
        ):
            MLKD()(student, source, {"target": torch.tensor(TARGET)})
        with pytest.raises(KdlabError, match="use mode=offline or mode=online"):
            MLKD().build(student, source)
    with pytest.raises(KdlabError, match=r"'strong' view have shape \(2, 6\), on the main input \(5, 6\)"):
        MLKD()(Outputs(s, views={"strong": Outputs(s[:2])}), Outputs(t, views={"strong": Outputs(t)}), {})


def test_bad_settings_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge.mlkd.temperatures=\[4, 0\]: temperatures must be a "):
        MLKD(temperatures=[4, 0])
    with pytest.raises(KdlabError, match=r"temperatures must be a non-empty list"):
        MLKD(temperatures=[])
    with pytest.raises(
        KdlabError, match=r"knowledge.mlkd.strong_temperatures=4: strong_temperatures must be a list"
    ):
        MLKD(strong_temperatures=4)
    with pytest.raises(KdlabError, match=r"knowledge.mlkd.confidence_percentile=150: .* \[0, 100\]"):
        MLKD(confidence_percentile=150)
    with pytest.raises(KdlabError, match=r"needs the batch's labels"):
        MLKD()(*pair(tensor(S_WEAK), tensor(T_WEAK), tensor(S_STRONG), tensor(T_STRONG)), {})
    assert MLKD(strong_temperatures=[], weak_unmasked_temperatures=[]).strong_temperatures == ()


def test_the_config_is_the_authors_recipe(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "knowledge=mlkd"])
    (mlkd,) = build_knowledge(cfg).values()
    assert isinstance(mlkd, MLKD) and mlkd.views == ("strong",)
    assert mlkd.temperatures == (4, 3, 5, 2, 6) and mlkd.strong_temperatures == (4, 3, 5)
    assert mlkd.weak_unmasked_temperatures == (2, 6) and mlkd.confidence_percentile == 50
    assert (mlkd.weight, mlkd.task_weight, mlkd.strong_task_weight) == (0.9, 0.1, 0.1)
    assert mlkd.logit_standardization is False


# ------------------------------------------------------------------ in the schemes
def resnet8():
    return create_model("resnet8", num_classes=10, in_channels=1, input_size=28)


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return {
        "input": torch.randn(n, 1, 28, 28, generator=g),
        "input_strong": torch.randn(n, 1, 28, 28, generator=g),
        "target": torch.arange(n) % 10,
        "index": torch.arange(n),
    }


def common():
    return dict(
        optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=10, input_shape=(1, 28, 28), num_samples=64
    )


def test_offline_runs_both_models_on_both_views_and_trains_the_student_only():
    torch.manual_seed(0)
    scheme = Offline(teacher=resnet8(), student=resnet8(), knowledge={"mlkd": MLKD()}, **common())
    scheme.log_terms = lambda terms, loss: None
    scheme.training_step(batch(), 0).backward()
    assert all(p.grad is None for p in scheme.teacher.parameters())
    assert sum(p.grad.abs().sum() for p in scheme.student.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("target", ["peers", "ensemble"])
def test_online_peers_learn_from_each_others_views(target):
    torch.manual_seed(0)
    scheme = Online(
        student=resnet8(), teacher=resnet8(), target=target, knowledge={"mlkd": MLKD()}, **common()
    )
    scheme.log_terms = lambda terms, loss: None
    scheme.training_step(batch(), 0).backward()
    for peer in scheme.peers.values():
        assert sum(p.grad.abs().sum() for p in peer.parameters() if p.grad is not None) > 0


def test_byot_has_no_strong_view_and_says_so():
    with pytest.raises(KdlabError, match=r"mode=byot \(mode=self\) compares the exits of one pass"):
        BYOT(student=resnet8(), knowledge={"mlkd": MLKD()}, **common())


def test_half_precision_logits_as_under_mixed_precision():
    # torch.quantile refuses half precision; the masks are computed in float32 then.
    sw, tw, ss, ts = (tensor(rows).to(torch.bfloat16) for rows in (S_WEAK, T_WEAK, S_STRONG, T_STRONG))
    value = MLKD()(*pair(sw, tw, ss, ts), {"target": torch.tensor(TARGET)})
    exact = MLKD()(
        *pair(*map(tensor, (S_WEAK, T_WEAK, S_STRONG, T_STRONG))), {"target": torch.tensor(TARGET)}
    )
    assert value.item() == pytest.approx(exact.item(), rel=5e-2)
