"""FT: the factor loss by hand and its invariances, the references' numbers, the paraphraser that only its
stage trains, the stage and the main fit through the CLI, and the errors."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import kdlab.run
from kdlab.errors import KdlabError
from kdlab.knowledge import Stage
from kdlab.knowledge.ft import FT, Paraphraser, Translator, factor_loss
from kdlab.models import create_model
from kdlab.run import train
from kdlab.schemes import Offline
from kdlab.taps import Outputs
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main

PAIR = ["model@teacher=resnet14", "model@student=resnet8"]

# Reference values, float64, on the seeded inputs of `case()`. The stage: RepDistiller
# (github.com/HobbitLong/RepDistiller, commit b84f547c5db6a35318d4671d7d5c4de74c822403, models/util.py
# Paraphraser(t_shape, k=0.5) and helper/pretrain.py init(): nn.MSELoss()(reconstruction, f_t)). The main
# loss: torchdistill's FTLoss(p=1, reduction='mean') (github.com/yoshitomo-matsubara/torchdistill, commit
# 3e4373c45214c5c56eebac481d5bfe8b8735aa05, torchdistill/losses/mid_level.py) on the factors of that
# paraphraser's encoder and of RepDistiller's Translator(use_bn=True) in train mode; the authors' code
# (github.com/Jangho-Kim/Factor-Transfer-pytorch, commit 19cce265ebe51c751481041e223a13be2e684322,
# nn.L1Loss()(utils.FT(factor_s), utils.FT(factor_t))) gives the same value. Every parameter was drawn
# from one generator (x 0.3) in the references' parameter order; RepDistiller's translator has biases
# before its BatchNorms, which kdlab drops (they cancel): their draws are skipped here.
REFERENCE = {
    "stage": 21.829372765617,
    "paraphraser_grad_squares": [
        2282.989961538321,
        271.5666221414558,
        5632.326420954313,
        216.52098467192218,
        3086.581754605948,
        83.08817406008681,
        5558.863690616626,
        58.77409396115784,
        3083.9563743004146,
        10.593305804223897,
        3635.5554028962924,
        5.313120390908591,
    ],
    "main": 0.0899191905559994,
    "student_grad_squares": 6.169664133398204e-05,
    "student_grad_0000": -0.00034337363580623124,
    # conv weight, BN scale, BN shift of each of the translator's three layers (the biases' sums are ~1e-18)
    "translator_grad_sums": [
        0.0051787060415757315,
        -0.022968280584959574,
        -0.004969682884170383,
        -0.0205561524964482,
        0.016726489773289915,
        0.00752454970264301,
        -0.025542252291082097,
        0.04997324221168967,
        -0.016016548551670895,
    ],
}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def outputs(name: str, x: torch.Tensor) -> Outputs:
    return Outputs(torch.zeros(x.shape[0], 3, dtype=torch.float64), {name: x})


def case() -> tuple[FT, Outputs, Outputs, torch.Tensor, list[torch.nn.Parameter]]:
    """Teacher map 8 x 4 x 4 and student map 6 x 4 x 4 (after ReLUs), then every parameter, drawn
    from one generator in the order the reference run drew them."""
    g = torch.Generator().manual_seed(0)
    t = randn(g, 2, 8, 4, 4).relu()
    s = randn(g, 2, 6, 4, 4).relu().requires_grad_()
    student, source = outputs("s", s), outputs("t", t)
    loss = FT(student_layers=["s"], teacher_layers=["t"])
    loss.build(student, source)
    [paraphraser] = loss.stage_modules("paraphraser")
    stage_params = list(paraphraser.parameters())
    with torch.no_grad():
        for p in stage_params:
            p.copy_(randn(g, *p.shape) * 0.3)
        for layer in range(3):  # RepDistiller's order: conv weight, conv bias, BN scale, BN shift
            conv, bn = loss.translator[3 * layer], loss.translator[3 * layer + 1]
            conv.weight.copy_(randn(g, *conv.weight.shape) * 0.3)
            randn(g, conv.out_channels)  # the bias kdlab does not have
            bn.weight.copy_(randn(g, bn.num_features) * 0.3)
            bn.bias.copy_(randn(g, bn.num_features) * 0.3)
    return loss, student, source, s, list(stage_params)


# ------------------------------------------------------------------------- by hand
def test_factor_loss_by_hand():
    # Sample 1: student (3, 4) -> (0.6, 0.8), teacher (1, 0): |0.6 - 1| + |0.8 - 0| = 1.2.
    # Sample 2: student (0, 2) -> (0, 1), teacher (0, 5) -> (0, 1): 0. Mean over the 4 elements: 0.3.
    s = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64).view(2, 2, 1, 1)
    t = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64).view(2, 2, 1, 1)
    assert factor_loss(s, t).item() == pytest.approx(0.3, rel=1e-12)
    # The whole factor is one vector: channels and positions together.
    s2 = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 2)
    t2 = torch.tensor([4.0, 3.0], dtype=torch.float64).view(1, 1, 1, 2)
    assert factor_loss(s2, t2).item() == pytest.approx((0.2 + 0.2) / 2, rel=1e-12)


def test_the_factor_loss_ignores_scale_is_zero_for_proportional_factors_and_pools_to_the_smaller_map():
    g = torch.Generator().manual_seed(3)
    s, t = randn(g, 3, 4, 2, 2), randn(g, 3, 4, 2, 2)
    base = factor_loss(s, t).item()
    assert factor_loss(2.5 * s, 0.1 * t).item() == pytest.approx(base, rel=1e-12)
    assert factor_loss(4.0 * t, t).item() == pytest.approx(0.0, abs=1e-15)
    large = randn(g, 3, 4, 4, 4)
    assert factor_loss(large, t).item() == pytest.approx(
        factor_loss(F.avg_pool2d(large, 2), t).item(), rel=1e-12
    )


def test_the_modules_have_the_references_shapes():
    paraphraser, translator = Paraphraser(8, 4), Translator(6, 4)
    x = torch.randn(2, 8, 5, 5)
    assert paraphraser(x, decode=False).shape == (2, 4, 5, 5) and paraphraser(x).shape == x.shape
    assert translator(torch.randn(2, 6, 5, 5)).shape == (2, 4, 5, 5)
    # Encoder C -> C -> kC -> kC (Conv2d weights are (out, in)), decoder kC -> kC -> C -> C
    # (ConvTranspose2d weights are (in, out)).
    assert [tuple(m.weight.shape) for m in paraphraser.modules() if hasattr(m, "weight")] == [
        (8, 8, 3, 3),
        (4, 8, 3, 3),
        (4, 4, 3, 3),
        (4, 4, 3, 3),
        (4, 8, 3, 3),
        (8, 8, 3, 3),
    ]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in Translator(6, 4, batch_norm=False).modules())


# -------------------------------------------------------------- the references' numbers
def test_stage_and_main_loss_and_gradients_match_repdistiller_torchdistill_and_the_authors_code():
    loss, student, source, s, stage_params = case()
    stage = loss.stage_loss("paraphraser", student, source, {})
    stage.backward()
    assert stage.item() == pytest.approx(REFERENCE["stage"], rel=1e-5)
    assert [p.grad.pow(2).sum().item() for p in stage_params] == pytest.approx(
        REFERENCE["paraphraser_grad_squares"], rel=1e-5
    )
    main = loss(student, source, {})
    main.backward()
    assert main.item() == pytest.approx(REFERENCE["main"], rel=1e-5)
    assert s.grad.pow(2).sum().item() == pytest.approx(REFERENCE["student_grad_squares"], rel=1e-5)
    assert s.grad[0, 0, 0, 0].item() == pytest.approx(REFERENCE["student_grad_0000"], rel=1e-5)
    sums = [p.grad.sum().item() for p in loss.translator.parameters()]
    assert sums == pytest.approx(REFERENCE["translator_grad_sums"], rel=1e-5)


# --------------------------------------------------------- the paraphraser: its stage's only
def test_the_paraphraser_trains_in_its_stage_only_and_the_translator_in_the_main_fit_only():
    loss, student, source, s, stage_params = case()
    assert loss.stage_only_modules() == [loss.paraphraser]  # the main fit keeps it fixed
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    optimizer = torch.optim.SGD(stage_params, lr=1e-3)
    loss.stage_loss("paraphraser", student, source, {}).backward()
    optimizer.step()
    changed = {k for k, v in loss.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"paraphraser.{name}" for name, _ in loss.paraphraser.named_parameters()}
    assert s.grad is None and all(p.grad is None for p in loss.translator.parameters())
    # The main fit: the translator and the student get gradients; the paraphraser (under no_grad) none.
    loss.paraphraser.zero_grad(set_to_none=True)
    loss(student, source, {}).backward()
    assert s.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in loss.translator.parameters())
    assert all(p.grad is None for p in loss.paraphraser.parameters())


def test_in_a_scheme_the_stage_trains_the_paraphraser_and_the_main_fit_the_student_and_translator():
    torch.manual_seed(0)
    scheme = Offline(
        teacher=create_model("resnet14", num_classes=10, in_channels=1, input_size=28),
        student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={"ft": FT(init_epochs=2)},
        num_samples=100,
    )
    term = scheme.knowledge["ft"]
    assert term.stages() == [Stage("paraphraser", epochs=2, trains_student=False, lr=None)]
    staged = scheme.stage_parameters(term, term.stages()[0])
    assert [p.shape for p in staged] == [p.shape for p in Paraphraser(64, 32).parameters()]
    main = {id(p) for p in scheme.trainable_parameters()}
    expected = {id(p) for p in (*scheme.student.parameters(), *term.translator.parameters())}
    assert main == expected and not main & {id(p) for p in staged}


# -------------------------------------------------------------------------- errors
def test_bad_settings_and_layers_it_cannot_paraphrase_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge\.ft\.rate=0"):
        FT(rate=0)
    with pytest.raises(KdlabError, match=r"knowledge\.ft\.translator_bn='yes'"):
        FT(translator_bn="yes")
    with pytest.raises(KdlabError, match=r"knowledge\.ft\.init_epochs=2\.5"):
        FT(init_epochs=2.5)
    x = torch.zeros(2, 8, 4, 4)
    with pytest.raises(KdlabError, match=r"knowledge\.ft\.rate=0\.1: .* int\(8 x 0\.1\) = 0 channels"):
        FT(student_layers=["s"], teacher_layers=["t"], rate=0.1).build(outputs("s", x), outputs("t", x))
    with pytest.raises(KdlabError, match=r"teacher's layer 't' gives shape \(2, 8\)"):
        FT(student_layers=["s"], teacher_layers=["t"]).build(outputs("s", x), outputs("t", torch.zeros(2, 8)))
    two = Outputs(torch.zeros(2, 3), {"a": x, "b": x})
    with pytest.raises(KdlabError, match=r"paraphrases one layer .* give 2 pairs"):
        FT(student_layers=["a", "b"], teacher_layers=["a", "b"]).build(two, two)
    with pytest.raises(KdlabError, match=r"call build\(\) before the first forward"):
        FT(student_layers=["s"], teacher_layers=["t"])(outputs("s", x), outputs("t", x), {})


def test_online_mode_has_no_fixed_teacher_to_paraphrase(tmp_path, fashion_mnist, teacher_store):
    overrides = [*fast_overrides(tmp_path, 2, teacher_store), "mode=online", "knowledge=ft", *PAIR, NO_PLOTS]
    with pytest.raises(KdlabError, match=r"knowledge\.ft runs a stage before the main fit.*mode=offline"):
        train(compose_config(overrides))


# ----------------------------------------------------------------------------- the CLI
def test_the_paraphraser_stage_and_the_main_fit_run_through_the_cli(
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
        "knowledge=ft",
        "knowledge.ft.init_epochs=1",
        *PAIR,
        NO_PLOTS,
    ]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "metrics.json").read_text())
    [stage] = result["stages"]
    assert (stage["knowledge"], stage["stage"], stage["epochs"]) == ("ft", "paraphraser", 1)
    assert math.isfinite(stage["final_loss"]) and stage["final_loss"] > 0
    assert math.isfinite(result["metrics"]["train/ft_epoch"])
    # The stage trained the paraphraser's weights, and no parameter of the student, translator or teacher.
    # (The student runs in train mode during every stage, so its BatchNorm statistics may move.)
    after = torch.load(run / "stages" / "ft-paraphraser" / "weights.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    paraphraser = {k for k in before if k.startswith("knowledge.ft.paraphraser.")}
    assert paraphraser and paraphraser <= changed
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(k.startswith("student.") and k.endswith(statistics) for k in changed - paraphraser)
