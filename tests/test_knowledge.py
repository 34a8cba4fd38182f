"""Knowledge losses against numbers computed by hand from the papers' formulas."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge import DIST, DKD, KD, LossContext
from kdlab.taps import Outputs


def out(logits) -> Outputs:
    return Outputs(torch.as_tensor(logits, dtype=torch.float64))


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
    with pytest.raises(KdlabError, match="temperature must be a finite number > 0"):
        KD(temperature=temperature)


def test_negative_weight_is_refused():
    with pytest.raises(KdlabError, match="weight"):
        KD(weight=-1)


# ---------------------------------------------------------------------------------------- DKD
def dkd_by_hand():
    # 3 classes, target 0, T=1. Student [0,0,0]: p_s = (1/3,1/3,1/3), binary (1/3, 2/3), non-target
    # (1/2,1/2). Teacher [0, ln 3, 0]: p_t = (1/5,3/5,1/5), binary (1/5, 4/5), non-target (3/4,1/4).
    tckd = 0.2 * math.log(0.2 / (1 / 3)) + 0.8 * math.log(0.8 / (2 / 3))
    nckd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    return tckd, nckd


def test_dkd_by_hand():
    tckd, nckd = dkd_by_hand()
    loss = DKD(alpha=1, beta=8, temperature=1, warmup_epochs=0)(
        out([[0.0, 0.0, 0.0]]), out([[0.0, math.log(3), 0.0]]), {"target": torch.tensor([0])}
    )
    assert loss.item() == pytest.approx(tckd + 8 * nckd, rel=1e-9)


def test_dkd_recovers_kd_with_the_papers_weights():
    # Eq. 5: KD = TCKD + (1 - p_target^teacher) * NCKD, per sample, at any T.
    torch.manual_seed(0)
    s, t, target, T = torch.randn(1, 7, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64), 3, 2.5
    p_target = torch.softmax(t / T, dim=1)[0, target].item()
    dkd = DKD(alpha=1, beta=1 - p_target, temperature=T, warmup_epochs=0)
    batch = {"target": torch.tensor([target])}
    assert dkd(Outputs(s), Outputs(t), batch).item() == pytest.approx(
        KD(temperature=T)(Outputs(s), Outputs(t), {}).item()
    )


def test_dkd_warms_up_linearly_from_the_epoch_in_its_context():
    tckd, nckd = dkd_by_hand()
    dkd = DKD(alpha=1, beta=8, temperature=1, warmup_epochs=20)
    args = (out([[0.0, 0.0, 0.0]]), out([[0.0, math.log(3), 0.0]]), {"target": torch.tensor([0])})
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        context = LossContext(epoch=epoch, max_epochs=200)
        assert dkd(*args, context).item() == pytest.approx(factor * (tckd + 8 * nckd), rel=1e-9)


def test_dkd_alone_without_a_context_says_it_needs_the_epoch():
    # Used outside a scheme, DKD must not silently stay at epoch 0 of its warm-up.
    dkd = DKD(warmup_epochs=20, name="my_dkd")
    with pytest.raises(KdlabError, match=r"knowledge.my_dkd \(DKD\) ramps .* needs the run's epoch"):
        dkd(out([[0.0, 1.0]]), out([[1.0, 0.0]]), {"target": torch.tensor([0])})


def test_dkd_is_zero_when_student_equals_teacher():
    logits = torch.randn(4, 6, dtype=torch.float64)
    loss = DKD(warmup_epochs=0)(
        Outputs(logits), Outputs(logits.clone()), {"target": torch.tensor([0, 1, 2, 5])}
    )
    assert loss.item() == pytest.approx(0, abs=1e-12)


# --------------------------------------------------------------------------------------- DIST
def test_dist_by_hand():
    # Logits log(p) give softmax = p exactly, so the Pearson correlations are of these rows/columns.
    y_s = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    y_t = [[0.6, 0.3, 0.1], [0.1, 0.4, 0.5]]
    inter = 1 - sum(statistics.correlation(a, b) for a, b in zip(y_s, y_t, strict=True)) / 2
    columns = lambda y: [list(c) for c in zip(*y, strict=True)]  # noqa: E731
    intra = 1 - sum(statistics.correlation(a, b) for a, b in zip(columns(y_s), columns(y_t), strict=True)) / 3
    loss = DIST(beta=2, gamma=0.5)(out(torch.tensor(y_s).log()), out(torch.tensor(y_t).log()), {})
    assert loss.item() == pytest.approx(2 * inter + 0.5 * intra, rel=1e-6)


def test_dist_is_zero_when_student_equals_teacher_and_scales_by_tau_squared():
    logits = torch.randn(5, 4, dtype=torch.float64)
    assert DIST()(Outputs(logits), Outputs(logits.clone()), {}).item() == pytest.approx(0, abs=1e-9)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y_s, y_t = torch.softmax(s / 3, 1), torch.softmax(t / 3, 1)
    at_tau3 = DIST(temperature=3)(Outputs(s), Outputs(t), {})
    at_tau1_of_softened = DIST(temperature=1)(Outputs(y_s.log()), Outputs(y_t.log()), {})
    assert at_tau3.item() == pytest.approx(9 * at_tau1_of_softened.item(), rel=1e-9)


@pytest.mark.parametrize("loss", [DKD, DIST])
def test_response_losses_refuse_non_positive_temperature(loss):
    with pytest.raises(KdlabError, match="temperature must be a finite number > 0"):
        loss(temperature=0)


# Reference values: the loss functions of the logit-standardisation authors' code
# (github.com/sunshangquan/logit-standardization-KD, commit f6e5aa5, mdistiller/distillers/KD.py
# `kd_loss` and DKD.py `dkd_loss`), run once on these float64 inputs (torch.Generator seed 0).
LS_STUDENT = [
    [-6.931235400702528, -1.119752583773293, -3.1824500356388588, 2.998528064343528, -0.05989425272328796],
    [0.6308996703050841, 0.5315680541809975, -2.491530153025347, 0.7161541745045119, 2.2005851055818524],
    [-3.9656454874264133, 3.94443409559137, -2.061011082130639, 4.464222947432017, -1.3452474141343533],
    [-2.6730091055122127, 2.0245726307820116, 3.1405961309443966, 0.46288553593976844, -2.2496745685175825],
]
LS_TEACHER = [
    [-5.327326540142452, -4.597675915135627, 6.832428602627427, 5.631162286484389, -4.20941429850165],
    [5.868065105239555, 0.6279027633453325, 5.326948539324389, 5.9727646255593765, 1.5747210397948628],
    [1.723345073802166, 6.370858591290341, -2.818318297436438, 7.6247164655773, 1.2918738526575628],
    [-4.008345014171189, 5.175737863521182, -0.46430733136876867, -1.8937180425391844, -16.398176207854938],
]
LS_TARGET = [0, 3, 1, 4]
LS_REFERENCE = {  # (method, T): the authors' value
    ("kd", 2.0): 0.4362188836889615,
    ("kd", 4.0): 0.47083885360832023,
    ("dkd", 2.0): 4.2209699416688755,
    ("dkd", 4.0): 4.486635615746188,
}


@pytest.mark.parametrize(("method", "temperature"), list(LS_REFERENCE))
def test_logit_standardisation_matches_the_authors_code(method, temperature):
    s, t = torch.tensor(LS_STUDENT, dtype=torch.float64), torch.tensor(LS_TEACHER, dtype=torch.float64)
    batch = {"target": torch.tensor(LS_TARGET)}
    if method == "kd":
        loss = KD(temperature=temperature, logit_standardization=True)
    else:
        loss = DKD(alpha=1, beta=8, temperature=temperature, warmup_epochs=0, logit_standardization=True)
    value = loss(Outputs(s), Outputs(t), batch).item()
    assert value == pytest.approx(LS_REFERENCE[method, temperature], rel=1e-5)


def test_standardized_logits_by_hand_and_the_invariance_the_paper_states():
    from kdlab.knowledge.response import standardized

    # [1, 2, 3]: mean 2, sample standard deviation 1.
    z = standardized(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    assert z.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    # Sec. 3: with standardisation the loss does not change when a model's logits are shifted and
    # scaled per sample, so the student need not match the teacher's logit magnitude.
    s, t = torch.tensor(LS_STUDENT, dtype=torch.float64), torch.tensor(LS_TEACHER, dtype=torch.float64)
    scale, shift = torch.tensor([[0.5], [3.0], [7.0], [1.5]], dtype=torch.float64), 4.0
    kd = KD(temperature=2, logit_standardization=True)
    base = kd(Outputs(s), Outputs(t), {}).item()
    # (up to the eps added to the standard deviation)
    assert kd(Outputs(s), Outputs(t * scale + shift), {}).item() == pytest.approx(base, rel=1e-6)
    assert kd(Outputs(s * scale - shift), Outputs(t), {}).item() == pytest.approx(base, rel=1e-6)
    assert KD(temperature=2)(Outputs(s), Outputs(t * scale), {}).item() != pytest.approx(base)


def test_the_ls_config_is_the_authors_kd_recipe(tmp_path):
    from tests.conftest import compose_config, fast_overrides

    cfg = compose_config([*fast_overrides(tmp_path), "knowledge=ls"])
    node = cfg.knowledge.ls
    assert (node.temperature, node.weight, node.task_weight, node.logit_standardization) == (
        2.0,
        9.0,
        0.1,
        True,
    )


# NKD's reference: the authors' NKDLoss (github.com/yzd-v/cls_KD, commit 1e5d48f,
# mmcls/models/dis_losses/nkd.py), run once on the inputs above: (T, gamma) -> value.
NKD_REFERENCE = {(1.0, 1.5): 3.7575724718297905, (4.0, 1.5): 33.23263661665143, (2.0, 0.5): 3.254979502283024}


@pytest.mark.parametrize(("temperature", "gamma"), list(NKD_REFERENCE))
def test_nkd_matches_the_authors_code(temperature, gamma):
    from kdlab.knowledge import NKD

    s, t = torch.tensor(LS_STUDENT, dtype=torch.float64), torch.tensor(LS_TEACHER, dtype=torch.float64)
    loss = NKD(temperature=temperature, gamma=gamma)(
        Outputs(s), Outputs(t), {"target": torch.tensor(LS_TARGET)}
    )
    assert loss.item() == pytest.approx(NKD_REFERENCE[temperature, gamma], rel=1e-5)


def test_nkd_by_hand():
    from kdlab.knowledge import NKD

    # Two classes: one non-target class, whose renormalised distribution is [1] on both sides, so
    # only the target term is left: -p_t^teacher * log p_t^student.
    s, t = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    p_teacher = math.exp(0) / (math.exp(0) + math.exp(2))
    log_p_student = 1 - math.log(math.exp(1) + 1)
    value = NKD(gamma=7.0)(Outputs(s), Outputs(t), {"target": torch.tensor([0])}).item()
    assert value == pytest.approx(-p_teacher * log_p_student, rel=1e-12)
    # Three classes, T=1, gamma=1: the non-target part is -sum q_t log q_s over the other two.
    s = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    q_t = [math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))]
    log_q_s = [1 - math.log(math.exp(1) + math.exp(3)), 3 - math.log(math.exp(1) + math.exp(3))]
    p_t = math.exp(2) / (math.exp(2) + 1 + math.exp(1))
    log_p_s = 0 - math.log(1 + math.exp(1) + math.exp(3))
    expected = -p_t * log_p_s - sum(a * b for a, b in zip(q_t, log_q_s, strict=True))
    value = NKD(temperature=1, gamma=1)(Outputs(s), Outputs(t), {"target": torch.tensor([0])}).item()
    assert value == pytest.approx(expected, rel=1e-12)
