"""Tf-KD (mode=tfkd): the virtual teacher and both variants' losses by hand and against the authors'
code, the variant picking its class and its teacher, clear errors, and CLI runs on Fashion-MNIST."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.build import scheme_class
from kdlab.errors import KdlabError
from kdlab.schemes import Offline, TfKD, TfKDSelf
from kdlab.schemes.tfkd import tfkd_reg_term, tfkd_self_term, virtual_teacher
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main

# The authors' code, github:yuanli2333/Teacher-free-Knowledge-Distillation at commit
# d000ab378a409535a5f5f645b473e05e27529a02, my_loss_function.py: loss_kd_regularization and loss_kd_self,
# run once outside kdlab in float64 on STUDENT, TEACHER and LABELS (their .cuda() made the identity).
STUDENT = [
    [-2.310411800234176, -0.3732508612577643, -1.0608166785462863, 0.9995093547811761, -0.019964750907762653],
    [0.2102998901016947, 0.17718935139366584, -0.830510051008449, 0.23871805816817063, 0.7335283685272841],
    [-1.3218818291421377, 1.3148113651971234, -0.6870036940435463, 1.4880743158106724, -0.4484158047114511],
    [-0.8910030351707375, 0.6748575435940039, 1.0468653769814655, 0.15429517864658948, -0.7498915228391941],
]
TEACHER = [
    [-3.7963959240854708, -3.358605549081376, 3.4994571615764567, 2.778697371890633, -3.1256485791009903],
    [2.9208390631437333, -0.2232583419928005, 2.5961691235946334, 2.9836587753356256, 0.3448326238769177],
    [0.4340070442812996, 3.222515154774205, -2.2909909784618625, 3.9748298793463794, 0.1751243115945377],
    [-3.0050070085027136, 2.5054427181127092, -0.8785843988212613, -1.7362308255235108, -10.438905724712964],
]
LABELS = [2, 0, 4, 2]
# (alpha, T, multiplier): (loss, d loss / d student[0, 0])
REFERENCE_REG = {  # params.reg_alpha, params.reg_temperature, params.multiplier; correct_prob 0.99
    (0.1, 20.0, 100.0): (2.5030740760190344, -0.08410782149846473),
    (0.95, 40.0, 1.0): (0.1682211213761336, -0.008220467179560983),
}
REFERENCE_SELF = {  # params.alpha, params.temperature, params.multiplier
    (0.95, 6.0, 50.0): (26.392646494878754, 0.600973762088807),
    (0.9, 20.0, 100.0): (59.382458038521754, 1.1701130692753008),
}


def tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def tfkd(**kwargs):
    scheme = TfKD(
        student=tiny(),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
        input_shape=(1, 2, 2),
        **kwargs,
    )
    scheme.log_terms = lambda terms, loss: scheme.__dict__.__setitem__("logged", terms)
    return scheme


def batch(n=6):
    g = torch.Generator().manual_seed(2)
    return {
        "input": torch.randn(n, 1, 2, 2, generator=g),
        "target": torch.arange(n) % 3,
        "index": torch.arange(n),
    }


# ------------------------------------------------------------------------------------------ the loss
def test_the_virtual_teacher_and_the_reg_term_by_hand():
    a, K, T = 0.9, 4, 2.0
    p = [a, (1 - a) / 3, (1 - a) / 3, (1 - a) / 3]  # label 0
    e = [math.exp(v / T) for v in p]
    teacher = [v / sum(e) for v in e]
    got = virtual_teacher(torch.tensor([0, 2]), K, a, T, torch.float64)
    assert got[0].tolist() == pytest.approx(teacher, rel=1e-12)
    assert got[1].tolist() == pytest.approx([teacher[1], teacher[2], teacher[0], teacher[3]], rel=1e-12)
    z = [0.5, -1.0, 2.0, 0.0]
    log_q = [v - math.log(sum(math.exp(u) for u in z)) for v in z]  # the student at T = 1
    kl = sum(t * (math.log(t) - lq) for t, lq in zip(teacher, log_q, strict=True))
    term = tfkd_reg_term(torch.tensor([z], dtype=torch.float64), torch.tensor([0]), a, T, multiplier=3.0)
    assert term.item() == pytest.approx(3.0 * kl / K, rel=1e-12)  # averaged over the K classes too


def test_the_self_term_by_hand():
    z, t, T = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], 3.0
    softmax = lambda row: [math.exp(v / T) / sum(math.exp(u / T) for u in row) for v in row]  # noqa: E731
    kl = sum(q * math.log(q / p) for p, q in zip(softmax(z), softmax(t), strict=True))
    got = tfkd_self_term(
        torch.tensor([z], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), T, 5.0
    )
    assert got.item() == pytest.approx(5.0 * T**2 * kl / 3, rel=1e-12)


def test_each_term_vanishes_when_the_student_predicts_its_teacher():
    target = torch.tensor([1, 0, 2])
    teacher = virtual_teacher(target, 3, 0.99, 20.0, torch.float64)
    assert tfkd_reg_term(teacher.log(), target, 0.99, 20.0, 100.0).item() == pytest.approx(0.0, abs=1e-12)
    logits = torch.randn(3, 3, dtype=torch.float64)
    assert tfkd_self_term(logits, logits + 4.0, 6.0, 50.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("alpha", "T", "multiplier"), list(REFERENCE_REG))
def test_tf_kd_reg_matches_the_authors_loss(alpha, T, multiplier):
    z = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(LABELS)
    loss = (1 - alpha) * F.cross_entropy(z, y) + alpha * tfkd_reg_term(z, y, 0.99, T, multiplier)
    loss.backward()
    expected, grad = REFERENCE_REG[alpha, T, multiplier]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert z.grad[0, 0].item() == pytest.approx(grad, rel=1e-5)


@pytest.mark.parametrize(("alpha", "T", "multiplier"), list(REFERENCE_SELF))
def test_tf_kd_self_matches_the_authors_loss(alpha, T, multiplier):
    z = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(TEACHER, dtype=torch.float64)
    loss = (1 - alpha) * F.cross_entropy(z, torch.tensor(LABELS)) + alpha * tfkd_self_term(
        z, t, T, multiplier
    )
    loss.backward()
    expected, grad = REFERENCE_SELF[alpha, T, multiplier]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert z.grad[0, 0].item() == pytest.approx(grad, rel=1e-5)


# ---------------------------------------------------------------------------------------- the scheme
def test_the_reg_scheme_trains_on_its_recipe():
    scheme = tfkd()
    assert type(scheme) is TfKD and scheme.variant == "reg"
    assert (scheme.temperature, scheme.alpha, scheme.multiplier, scheme.correct_prob) == (
        20.0,
        0.1,
        100.0,
        0.99,
    )
    assert scheme.task_weight == pytest.approx(0.9)
    b = batch()
    loss = scheme.training_step(b, 0)
    logits = scheme.student(b["input"])
    expected = 0.9 * F.cross_entropy(logits, b["target"]) + 0.1 * tfkd_reg_term(
        logits, b["target"], 0.99, 20.0, 100.0
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(scheme.logged) == {"task", "tfkd"}
    loss.backward()
    assert all(p.grad is not None for p in scheme.student.parameters())


def test_variant_self_builds_an_offline_scheme_around_the_pretrained_copy():
    teacher = tiny()
    scheme = tfkd(variant="self", teacher=teacher, temperature=4.0)
    assert isinstance(scheme, TfKDSelf) and isinstance(scheme, Offline) and isinstance(scheme, TfKD)
    assert scheme.name == "tfkd"
    assert (scheme.temperature, scheme.alpha, scheme.multiplier) == (4.0, 0.95, 50.0)  # null: recipe
    assert set(scheme.models()) == {"teacher", "student"} and not scheme.teacher.training
    b = batch()
    loss = scheme.training_step(b, 0)
    logits = scheme.student(b["input"])
    with torch.no_grad():
        t = teacher(b["input"])
    expected = 0.05 * F.cross_entropy(logits, b["target"]) + 0.95 * tfkd_self_term(logits, t, 4.0, 50.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen


def test_variant_self_takes_generation_zero_of_the_students_architecture_from_the_store(tmp_path):
    class Store:
        def generations(self, cfg, datamodule, count):
            self.count = count
            return "pretrained", {}, "record"

    store = Store()
    cfg = compose_config(
        [*fast_overrides(tmp_path), "mode=tfkd", "mode.variant=self", "model@student=resnet8"]
    )
    sources = TfKD.sources_for(cfg, None, store)
    assert store.count == 1 and sources.modules == {"teacher": "pretrained"} and sources.frozen == "record"
    assert sources.architectures == {"teacher": "resnet8"} and sources.frozen_config.name == "resnet8"
    reg = compose_config([*fast_overrides(tmp_path), "mode=tfkd"])
    assert TfKD.sources_for(reg, None, store).modules == {}


def test_mode_tfkd_config(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=tfkd"])
    assert scheme_class(cfg) is TfKD and TfKD.name == "tfkd" and not cfg.get("knowledge")
    assert cfg.mode.variant == "reg" and cfg.mode.correct_prob == 0.99
    assert cfg.mode.temperature is None and cfg.mode.alpha is None  # the variant's recipe


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(KdlabError, match=r"^mode.variant='teacher' is not a Tf-KD variant"):
        tfkd(variant="teacher")
    with pytest.raises(KdlabError, match=r"^mode.alpha=1.5: .*<= 1"):
        tfkd(alpha=1.5)
    with pytest.raises(KdlabError, match=r"^mode.temperature=0: .* e.g. mode.temperature=20"):
        tfkd(temperature=0)
    with pytest.raises(KdlabError, match="variant=self distils from a pre-trained copy"):
        tfkd(variant="self")
    cfg = compose_config([*fast_overrides(tmp_path), "mode=tfkd", "knowledge=kd"])
    with pytest.raises(KdlabError, match="mode=tfkd computes its own loss .* knowledge=kd"):
        TfKD.sources_for(cfg, None, None)


# --------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("variant", ["reg", "self"])
def test_a_tfkd_run_on_fashion_mnist(variant, tmp_path, fashion_mnist, teacher_store):
    args = [
        *cli_overrides(tmp_path, teacher_store=teacher_store),
        "mode=tfkd",
        f"mode.variant={variant}",
        "teacher_training.trainer.max_epochs=1",
        NO_PLOTS,
    ]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results["mode"] == "tfkd" and results["knowledge"] == []
    metrics = results["metrics"]
    assert math.isfinite(metrics["train/tfkd"]) and metrics["train/tfkd"] >= 0
    assert 0 <= metrics["test/student/top1"] <= 1
    models = {row["model"]: row["architecture"] for row in results["models"]}
    if variant == "reg":
        assert models == {"student": "lightnn"} and results["teacher"] is None
    else:  # the teacher is the student's architecture, trained alone first and kept in the store
        assert models == {"teacher": "lightnn", "student": "lightnn"}
        assert results["teacher"]["path"].startswith(str(teacher_store))
        meta = json.loads(
            (teacher_store / results["teacher"]["path"].split("/")[-2] / "meta.json").read_text()
        )
        assert meta["spec"]["model"]["name"] == "lightnn" and "born_again" not in meta["spec"]
