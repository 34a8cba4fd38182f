"""Schemes: the frozen teacher stays frozen, only the student and adapters are optimised."""

from __future__ import annotations

import csv
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from kdlab.errors import KdlabError
from kdlab.knowledge import KD, Knowledge
from kdlab.models import create_model
from kdlab.schemes import Baseline, Offline
from tests.conftest import compose_config, fast_overrides


class HintProbe(Knowledge):
    """A test double with a learnable adapter built from the real shapes (FitNets-like)."""

    def __init__(self, student_layer="features", source_layer="layer3", value=None):
        super().__init__(weight=1.0, student_layers=[student_layer], teacher_layers=[source_layer])
        self.value = value

    def build(self, student, source, context=None):
        s, t = student.feats[self.student_layers[0]], source.feats[self.teacher_layers[0]]
        self.adapter = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)

    def forward(self, student, source, batch, context=None):
        if self.value is not None:
            return torch.tensor(self.value)
        s = self.adapter(student.feats[self.student_layers[0]])
        t = source.feats[self.teacher_layers[0]]
        return F.mse_loss(F.adaptive_avg_pool2d(s, t.shape[-2:]), t)


def offline(knowledge, teacher=None, **kwargs):
    return Offline(
        teacher=teacher or create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
        student=create_model("lightnn", num_classes=10, in_channels=1, input_size=28),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge=knowledge,
        **kwargs,
    )


@pytest.fixture()
def datamodule(tmp_path, fashion_mnist):
    return instantiate(compose_config(fast_overrides(tmp_path)).data)


def fit(scheme, datamodule, **trainer_args):
    settings = {
        "max_epochs": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    trainer = L.Trainer(**{**settings, **trainer_args})
    trainer.fit(scheme, datamodule=datamodule)
    return trainer


def test_teacher_is_bit_identical_and_in_eval_mode_after_an_offline_epoch(datamodule):
    scheme = offline({"kd": KD(), "hint": HintProbe()})
    teacher_before = {k: v.clone() for k, v in scheme.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in scheme.student.state_dict().items()}
    adapter_before = scheme.knowledge["hint"].adapter.weight.clone()
    trainer = fit(scheme, datamodule)

    # BatchNorm buffers included: a teacher left in train mode would change them.
    for name, value in scheme.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not scheme.teacher.training and not any(m.training for m in scheme.teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in scheme.teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in scheme.student.state_dict().items())
    assert not torch.equal(scheme.knowledge["hint"].adapter.weight, adapter_before)

    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    expected = {id(p) for p in scheme.student.parameters()} | {id(p) for p in scheme.knowledge.parameters()}
    assert optimised == expected
    assert not optimised & {id(p) for p in scheme.teacher.parameters()}


def test_train_mode_cannot_unfreeze_the_teacher():
    scheme = offline({"kd": KD()})
    scheme.train()
    assert scheme.student.training and not scheme.teacher.training


def test_task_weight_follows_the_recipe_unless_set():
    assert offline({"kd": KD()}).task_weight == pytest.approx(0.1)
    assert offline({"kd": KD(), "hint": HintProbe()}).task_weight == 1.0
    assert offline({"kd": KD()}, task_weight=0.5).task_weight == 0.5


def test_weighted_sum_of_terms():
    scheme = offline({"kd": KD(weight=0.9), "hint": HintProbe()})
    terms = {"task": torch.tensor(2.0), "kd": torch.tensor(3.0), "hint": torch.tensor(5.0)}
    assert scheme.weighted_sum(terms).item() == pytest.approx(1.0 * 2 + 0.9 * 3 + 1.0 * 5)


def test_teacher_with_other_number_of_classes_is_refused():
    teacher = create_model("deepnn", num_classes=5, in_channels=1, input_size=28)
    with pytest.raises(KdlabError, match=r"shape \(2, 5\).*10 classes"):
        offline({"kd": KD()}, teacher=teacher)


def test_unknown_layer_of_a_knowledge_term_is_refused():
    with pytest.raises(KdlabError, match="no module named 'stage9'"):
        offline({"hint": HintProbe(source_layer="stage9")})


def test_nan_loss_stops_with_a_clear_error(datamodule):
    scheme = offline({"bad": HintProbe(value=float("nan"))})
    with pytest.raises(KdlabError, match=r"loss became nan at step .*bad=nan.*learning rate"):
        fit(scheme, datamodule, log_every_n_steps=1)


def test_baseline_trains_the_model_with_cross_entropy_only(datamodule):
    model = create_model("lightnn", num_classes=10, in_channels=1, input_size=28)
    scheme = Baseline(
        student=model,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={"kd": KD()},
        model_name="teacher",
    )
    assert len(scheme.knowledge) == 0 and scheme.task_weight == 1.0
    trainer = fit(scheme, datamodule)
    assert "val/teacher/top1" in trainer.callback_metrics
    assert "train/task" in trainer.callback_metrics


@pytest.mark.parametrize("every", [1, 2])
def test_loss_terms_are_logged_at_the_loggers_cadence_and_averaged_per_epoch(tmp_path, datamodule, every):
    from lightning.pytorch.loggers import CSVLogger

    scheme = offline({"kd": KD()})
    trainer = fit(
        scheme,
        datamodule,
        limit_train_batches=4,
        log_every_n_steps=every,
        logger=CSVLogger(tmp_path, name="", version=""),
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    steps = [row for row in rows if row.get("train/kd_step")]
    # Step values on the steps the logger writes: all four, or steps 1 and 3 (0-based) of four.
    assert [int(row["step"]) for row in steps] == list(range(every - 1, 4, every))
    assert all(row["train/task_step"] and row["train/loss_step"] for row in steps)
    epoch = next(row for row in rows if row.get("train/kd_epoch"))
    assert float(epoch["train/loss_epoch"]) == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    if every == 1:  # every step is logged, so the epoch value is their mean
        mean = sum(float(row["train/kd_step"]) for row in steps) / len(steps)
        assert float(epoch["train/kd_epoch"]) == pytest.approx(mean, rel=1e-5)
