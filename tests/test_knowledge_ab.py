"""AB: the alternative loss by hand, what it ignores, the references' numbers, the connectors that only
the init stage trains, the init stage and the main fit through the CLI, and the errors."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

import kdlab.run
from kdlab.errors import KdlabError
from kdlab.knowledge import Stage
from kdlab.knowledge.ab import AB, alternative_loss
from kdlab.knowledge.ofd import Connector
from kdlab.models import create_model
from kdlab.run import train
from kdlab.schemes import Offline
from kdlab.taps import Outputs
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main

STUDENT = ("s1", "s2", "s3")
TEACHER = ("t1", "t2", "t3")
PAIR = ["model@teacher=resnet14", "model@student=resnet8"]

# Reference values, float64, on the seeded inputs of `case()`: RepDistiller
# (github.com/HobbitLong/RepDistiller, commit b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/AB.py: sum(ABLoss(3)(g_s, g_t))) on the outputs of the authors' connectors
# (github.com/bhheo/AB_distillation, commit a7701d3506e13da87bda75aba1cee6397408144f,
# models/distillation_module.py Active_Soft_WRN_norelu's Connect1..3, parameters drawn from the same
# generator). The authors' own loss lines
# (cifar10_AB_distillation.py: criterion_alternative_L2 / batch / 2^k, then / 1000 * 3) and torchdistill's
# AltActTransferLoss (github.com/yoshitomo-matsubara/torchdistill, commit
# 3e4373c45214c5c56eebac481d5bfe8b8735aa05, pair weights 1/4, 1/2, 1, reduction mean, times 3/1000) give
# the same training value to the last digit or two.
REFERENCE = {
    # connectors in eval mode (running statistics 0 and 1), as in RepDistiller's main fit
    "main_fit": 2.05362043117413,
    "init": 1.7949384982029735,  # connectors in train mode (batch statistics): the init stage
    "student_grad_squares": [0.00037631608622144987, 0.0001303615222699428, 0.0009510302355481045],
    "student3_grad_0000": 0.002879823304830722,
    "connector0_conv_grad_sum": -0.0027071382018668327,
    "connector2_bn_weight_grad_sum": -0.1309109905133919,
    "connector0_running_mean_sum": 0.017880313424387395,
}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def outputs(feats: dict[str, torch.Tensor]) -> Outputs:
    return Outputs(torch.zeros(next(iter(feats.values())).shape[0], 3, dtype=torch.float64), feats)


def case() -> tuple[AB, Outputs, Outputs, list[torch.Tensor], list]:
    """Three pre-ReLU maps per model (student 4/8/16 channels at 8/4/2 px, teacher twice the widths)
    and the connectors' parameters, drawn from one generator in the order the reference run drew them."""
    g = torch.Generator().manual_seed(0)
    s = [randn(g, *shape).requires_grad_() for shape in ((2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2))]
    t = [randn(g, *shape) for shape in ((2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2))]
    student, source = outputs(dict(zip(STUDENT, s, strict=True))), outputs(dict(zip(TEACHER, t, strict=True)))
    loss = AB(student_layers=STUDENT, teacher_layers=TEACHER)
    loss.build(student, source)
    stage_params = [list(connector.parameters()) for connector in loss.connectors]
    with torch.no_grad():
        for params in stage_params:
            for p in params:
                p.copy_(randn(g, *p.shape) * 0.5)
    return loss, student, source, s, stage_params


# ------------------------------------------------------------------------- by hand
def test_alternative_loss_by_hand():
    # Teacher off (t <= 0, 0 included) for the first three, on for the last three; margin 1.
    # Off: s = -2 is past -1 (0); s = -0.5: (−0.5 + 1)^2 = 0.25; s = 0.5: 1.5^2 = 2.25.
    # On: s = 2 is past 1 (0); s = 0.3: (0.3 − 1)^2 = 0.49; s = -1.5: (−2.5)^2 = 6.25.
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.3, -1.5], dtype=torch.float64)
    t = torch.tensor([-1.0, 0.0, -3.0, 1.0, 0.2, 5.0], dtype=torch.float64)
    assert alternative_loss(s, t, 1.0).item() == pytest.approx(0.25 + 2.25 + 0.49 + 6.25, rel=1e-12)
    # Exactly at the margin counts as past it on the off side (s > -mu is false), and is 0 on the on side.
    assert alternative_loss(torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, 1.0]), 1.0).item() == 0.0
    # Margin 2: s = -0.5 off: 1.5^2; s = 0.3 on: 1.7^2.
    assert alternative_loss(s[[1, 4]], t[[1, 4]], 2.0).item() == pytest.approx(1.5**2 + 1.7**2, rel=1e-12)


def test_layers_weigh_powers_of_two_towards_the_deepest_and_the_sum_is_scaled_by_three_thousandths():
    g = torch.Generator().manual_seed(1)
    s = [randn(g, 2, 3, 4, 4), randn(g, 2, 5, 2, 2)]
    t = [randn(g, 2, 3, 4, 4), randn(g, 2, 5, 2, 2)]
    loss = AB(student_layers=["s1", "s2"], teacher_layers=["t1", "t2"], margin=0.5)
    student, source = outputs({"s1": s[0], "s2": s[1]}), outputs({"t1": t[0], "t2": t[1]})
    loss.build(student, source)
    assert all(isinstance(c, torch.nn.Identity) for c in loss.connectors)  # equal widths: no connector
    by_hand = 3 / 1000 * (alternative_loss(s[0], t[0], 0.5) / 2 + alternative_loss(s[1], t[1], 0.5)) / 2
    assert loss.stage_loss("init", student, source, {}).item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert loss(student, source, {}).item() == pytest.approx(by_hand.item(), rel=1e-12)


# ----------------------------------------------------------------- what the loss ignores
def test_no_loss_once_the_student_is_past_the_margin_on_the_teachers_side_and_only_the_teachers_sign_counts():
    g = torch.Generator().manual_seed(2)
    t = randn(g, 2, 4, 3, 3)
    loss = AB(student_layers=["s"], teacher_layers=["t"])
    past = torch.where(t > 0, 1.0 + t.abs(), -1.0 - t.abs()).requires_grad_()
    loss.build(outputs({"s": past}), outputs({"t": t}))
    value = loss.stage_loss("init", outputs({"s": past}), outputs({"t": t}), {})
    value.backward()
    assert value.item() == 0.0 and past.grad.abs().sum() == 0
    # The boundaries are the teacher's signs: rescaling its responses changes nothing.
    s = randn(g, 2, 4, 3, 3)
    base = loss(outputs({"s": s}), outputs({"t": t}), {})
    assert loss(outputs({"s": s}), outputs({"t": 7.5 * t}), {}).item() == pytest.approx(
        base.item(), rel=1e-12
    )


# -------------------------------------------------------------- the references' numbers
def test_loss_gradients_and_statistics_match_repdistiller_and_the_authors_code():
    loss, student, source, s, stage_params = case()
    # The main fit's term first (its connectors in eval mode, as a scheme keeps them there), before a
    # train-mode pass moves the connectors' running statistics.
    loss.connectors.eval()
    assert loss(student, source, {}).item() == pytest.approx(REFERENCE["main_fit"], rel=1e-5)
    loss.connectors.train()
    value = loss.stage_loss("init", student, source, {})
    value.backward()
    assert value.item() == pytest.approx(REFERENCE["init"], rel=1e-5)
    assert [x.grad.pow(2).sum().item() for x in s] == pytest.approx(
        REFERENCE["student_grad_squares"], rel=1e-5
    )
    assert s[2].grad[0, 0, 0, 0].item() == pytest.approx(REFERENCE["student3_grad_0000"], rel=1e-5)
    conv0, bn2_weight = stage_params[0][0], stage_params[2][1]
    assert conv0.grad.sum().item() == pytest.approx(REFERENCE["connector0_conv_grad_sum"], rel=1e-5)
    assert bn2_weight.grad.sum().item() == pytest.approx(REFERENCE["connector2_bn_weight_grad_sum"], rel=1e-5)
    running_mean = loss.connectors[0][1].running_mean
    assert running_mean.sum().item() == pytest.approx(REFERENCE["connector0_running_mean_sum"], rel=1e-5)


# ------------------------------------------------------- connectors: the init stage's only
def test_the_connectors_train_in_the_init_stage_only_and_are_saved_with_the_loss():
    loss, student, source, _, stage_params = case()
    assert loss.stage_modules("init") == [loss.connectors] == loss.stage_only_modules()
    assert {"connectors.0.0.weight", "connectors.0.1.weight", "connectors.0.1.bias"} <= set(loss.state_dict())
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    optimizer = torch.optim.SGD([p for params in stage_params for p in params], lr=0.5)
    loss.stage_loss("init", student, source, {}).backward()
    optimizer.step()
    after = loss.state_dict()
    assert not torch.equal(after["connectors.0.0.weight"], before["connectors.0.0.weight"])
    # Loaded into a fresh loss, the trained connectors give the main fit's term the same value.
    fresh = AB(student_layers=STUDENT, teacher_layers=TEACHER)
    fresh.build(student, source)
    fresh.load_state_dict(after)
    with torch.no_grad():
        loss.connectors.eval()
        fresh.connectors.eval()
        assert fresh(student, source, {}).item() == loss(student, source, {}).item()


def test_in_a_scheme_the_stage_trains_student_and_connectors_and_the_main_fit_neither_connector():
    torch.manual_seed(0)
    scheme = Offline(
        teacher=create_model("resnet8x4", num_classes=10, in_channels=1, input_size=28),
        student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={"ab": AB(init_epochs=3, init_lr=0.02)},
        num_samples=100,
    )
    term = scheme.knowledge["ab"]
    assert term.stages() == [Stage("init", epochs=3, trains_student=True, lr=0.02)]
    assert len(term.connectors) == 3 and all(isinstance(c, Connector) for c in term.connectors)
    staged = {id(p) for p in scheme.stage_parameters(term, term.stages()[0])}
    head = {id(p) for p in scheme.student.fc.parameters()}
    body = {id(p) for p in scheme.student.parameters()} - head
    assert body < staged and not head & staged
    assert len(staged - body) == 9  # conv, BN scale, BN shift of three connectors
    main = {id(p) for p in scheme.trainable_parameters()}
    assert main == body | head
    # Set up for the main fit, the connectors take no gradient and stay in eval mode.
    scheme.setup("fit")
    scheme.train()
    assert not any(p.requires_grad for p in term.connectors.parameters())
    assert not any(m.training for m in term.connectors.modules()) and scheme.student.training


# -------------------------------------------------------------------------- errors
def test_bad_settings_and_pairs_it_cannot_match_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge\.ab\.margin=0"):
        AB(margin=0)
    with pytest.raises(KdlabError, match=r"knowledge\.ab\.init_epochs=0: .*init_epochs=30"):
        AB(init_epochs=0)
    with pytest.raises(KdlabError, match=r"knowledge\.ab\.init_lr=-1"):
        AB(init_lr=-1)
    x = torch.zeros(2, 4, 4, 4)
    loss = AB(student_layers=["s"], teacher_layers=["t"])
    with pytest.raises(KdlabError, match=r"student's 's' is \(4, 4\) and the teacher's 't' \(8, 8\)"):
        loss.build(outputs({"s": x}), outputs({"t": torch.zeros(2, 4, 8, 8)}))
    with pytest.raises(KdlabError, match=r"teacher's layer 't' gives shape \(2, 16\).*stages_preact"):
        loss.build(outputs({"s": x}), outputs({"t": torch.zeros(2, 16)}))
    # The tutorial nets have no pre-activation taps: refused when the scheme expands the layers.
    with pytest.raises(KdlabError, match=r"teacher \(DeepNN\) has no pre-activation stage taps"):
        Offline(
            teacher=create_model("deepnn", num_classes=10, in_channels=1, input_size=28),
            student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"ab": AB()},
            num_samples=100,
        )


def test_online_mode_has_no_fixed_source_for_the_init_stage(tmp_path, fashion_mnist, teacher_store):
    overrides = [*fast_overrides(tmp_path, 2, teacher_store), "mode=online", "knowledge=ab", *PAIR, NO_PLOTS]
    with pytest.raises(KdlabError, match=r"knowledge\.ab runs a stage before the main fit.*mode=offline"):
        train(compose_config(overrides))


# ----------------------------------------------------------------------------- the CLI
def test_the_init_stage_and_the_main_fit_run_through_the_cli(
    tmp_path, fashion_mnist, teacher_store, monkeypatch
):
    before = {}
    run_stages = kdlab.run.run_stages

    def spy(cfg, scheme, *args, **kwargs):
        before.update({k: v.detach().clone() for k, v in scheme.state_dict().items()})
        return run_stages(cfg, scheme, *args, **kwargs)

    monkeypatch.setattr(kdlab.run, "run_stages", spy)
    args = [
        *cli_overrides(tmp_path, 2, teacher_store),
        "knowledge=ab",
        "knowledge.ab.init_epochs=1",
        *PAIR,
        NO_PLOTS,
    ]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "metrics.json").read_text())
    [stage] = result["stages"]
    assert (stage["knowledge"], stage["stage"], stage["epochs"]) == ("ab", "init", 1)
    assert math.isfinite(stage["final_loss"]) and stage["final_loss"] > 0
    assert math.isfinite(result["metrics"]["train/ab_epoch"])
    # The stage trained the student's layers, not its classifier, nor the teacher.
    after = torch.load(run / "stages" / "ab-init" / "weights.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("student.") and k.endswith("conv1.weight") for k in changed)
    assert not any(k.startswith(("student.fc.", "teacher.")) for k in changed)
