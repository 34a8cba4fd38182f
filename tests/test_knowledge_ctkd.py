"""CTKD: the learned temperature, its gradient reversal and the cosine curriculum, checked against the
reference code's numbers and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge import CTKD, KD, LossContext
from kdlab.taps import Outputs
from tests.test_knowledge import LS_STUDENT, LS_TEACHER

# Reference values: the CTKD code in github.com/sunshangquan/logit-standardization-KD (commit f6e5aa5:
# CTKD/models/temp_global.py Global_T with its GradientReversal, CTKD/distiller_zoo/KD.py DistillKL,
# temp = 1 + 20 * sigmoid(Global_T(...)) as in CTKD/helper/loops.py, CosineDecay(0, -1, 10) from
# CTKD/train_student.py), run once on LS_STUDENT / LS_TEACHER in float64 with lambda = -0.6.
REFERENCE = {
    "temperature": 15.621171572600097,
    "loss": 8.09958699813309,
    "theta_grad": -0.17110275259615385,
    "student_grad_00": 0.011486922128704105,
    "lambda": {1: -0.02447174185242318, 5: -0.5, 10: -1.0, 30: -1.0},  # 1-based epoch -> lambda
}


def built(**kwargs) -> CTKD:
    ctkd = CTKD(**kwargs)
    ctkd.build(Outputs(torch.zeros(2, 5)), Outputs(torch.zeros(2, 5)))
    return ctkd.double()


def test_global_temperature_loss_and_reversed_gradient_match_the_reference(monkeypatch):
    ctkd = built()
    monkeypatch.setattr(ctkd, "curriculum", lambda context: -0.6)
    s = torch.tensor(LS_STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(LS_TEACHER, dtype=torch.float64)
    loss = ctkd(Outputs(s), Outputs(t), {}, LossContext(epoch=0))
    loss.backward()
    assert ctkd.current_temperature() == pytest.approx(REFERENCE["temperature"], rel=1e-6)
    assert loss.item() == pytest.approx(REFERENCE["loss"], rel=1e-5)
    assert ctkd.theta.grad.item() == pytest.approx(REFERENCE["theta_grad"], rel=1e-5)
    assert s.grad[0, 0].item() == pytest.approx(REFERENCE["student_grad_00"], rel=1e-5)


def test_the_curriculum_is_the_references_cosine_ramp():
    ctkd = built()
    for one_based, expected in REFERENCE["lambda"].items():
        assert ctkd.curriculum(LossContext(epoch=one_based - 1, max_epochs=240)) == pytest.approx(expected)
    # null: the ramp spans the run; at the last epoch lambda has reached lambda_min.
    whole_run = built(curriculum_epochs=None)
    assert whole_run.curriculum(LossContext(epoch=99, max_epochs=100)) == pytest.approx(-1.0)
    assert whole_run.curriculum(LossContext(epoch=49, max_epochs=100)) == pytest.approx(-0.5)


def test_at_a_fixed_temperature_ctkd_is_kd_and_the_reversal_flips_the_temperatures_gradient():
    s = torch.tensor(LS_STUDENT, dtype=torch.float64)
    t = torch.tensor(LS_TEACHER, dtype=torch.float64)
    ctkd = built()
    temperature = ctkd.current_temperature()
    kd = KD(temperature=temperature)(Outputs(s), Outputs(t), {}).item()
    grads = {}
    for scale in (1.0, -1.0):
        ctkd.zero_grad()
        ctkd.curriculum = lambda context, scale=scale: scale
        value = ctkd(Outputs(s), Outputs(t), {}, LossContext())
        value.backward()
        grads[scale] = ctkd.theta.grad.item()
        assert value.item() == pytest.approx(kd, rel=1e-9)
    assert grads[-1.0] == pytest.approx(-grads[1.0]) and grads[1.0] != 0


def test_instance_mode_gives_each_sample_its_own_temperature_and_trains_its_module():
    ctkd = built(mode="instance")
    s = torch.tensor(LS_STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(LS_TEACHER, dtype=torch.float64)
    temperatures = ctkd.temperature(s, t, -1.0)
    assert temperatures.shape == (4, 1) and len(set(temperatures.view(-1).tolist())) == 4
    assert ((temperatures > 1.0) & (temperatures < 21.0)).all()
    # By hand: the per-sample KL, each scaled by its own T^2, averaged.
    T = temperatures.detach()
    p_t, log_p_s = torch.softmax(t / T, 1), torch.log_softmax(s.detach() / T, 1)
    expected = ((p_t * (p_t.log() - log_p_s)).sum(1) * T.view(-1) ** 2).mean()
    value = ctkd(Outputs(s), Outputs(t), {}, LossContext(epoch=20))
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctkd.temperature_net.parameters())


def test_bad_settings_and_a_missing_context_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge.ctkd.mode='both' is not one of global, instance"):
        CTKD(mode="both")
    with pytest.raises(
        KdlabError, match=r"knowledge.ctkd \(CTKD\) follows a curriculum .* needs the run's epoch"
    ):
        built()(Outputs(torch.zeros(2, 5)), Outputs(torch.zeros(2, 5)), {})
    with pytest.raises(KdlabError, match=r"curriculum_epochs=null spans the run's epochs"):
        built(curriculum_epochs=None).curriculum(LossContext(epoch=0, max_epochs=None))
    assert math.isfinite(built().curriculum(LossContext(epoch=3)))
