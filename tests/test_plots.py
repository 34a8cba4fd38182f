"""The figures of a run (kdlab.plots): the data they show, and the PNG files every scheme writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from kdlab.data import FashionMNISTDataModule, MNISTDataModule
from kdlab.errors import KdlabError
from kdlab.plots import PlotsCallback, class_labels, per_class_accuracy, plotted_models, soft_targets
from kdlab.run import train
from tests.conftest import compose_config, fast_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEST_FIGURES = ("soft_targets", "confusion_matrices", "per_class_accuracy")


def test_soft_targets_are_the_temperature_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    probabilities = soft_targets(logits, [1, 2, 4])
    assert probabilities.shape == (3, 2, 3)
    for k, t in enumerate([1, 2, 4]):
        for i, row in enumerate(logits.tolist()):
            weights = [math.exp(z / t) for z in row]
            expected = [w / sum(weights) for w in weights]
            assert probabilities[k, i].tolist() == pytest.approx(expected, abs=1e-6)
    # The figure's point: the top class's probability falls as T grows (the targets flatten).
    top = probabilities[:, 0, 0]
    assert top[0] > top[1] > top[2] > 1 / 3


def test_a_bad_temperature_fails_when_the_callback_is_built(tmp_path):
    with pytest.raises(KdlabError, match=r"callbacks.plots.temperatures=\[1, 0\]"):
        PlotsCallback(tmp_path, temperatures=[1, 0])


def test_figures_show_the_teacher_and_student_when_the_scheme_has_them():
    assert plotted_models(["student", "teacher", "ensemble"]) == ["teacher", "student"]
    assert plotted_models(["student", "exit1", "exits_ensemble"]) == ["student"]


def fake_trainer(**state) -> SimpleNamespace:
    defaults = {"is_global_zero": True, "loggers": [], "global_step": 0, "sanity_checking": False}
    return SimpleNamespace(**{**defaults, **state})


def test_test_figures_read_the_first_samples_and_count_every_batch(tmp_path):
    callback = PlotsCallback(tmp_path / "plots", temperatures=[1, 2], num_samples=3)
    teacher = torch.eye(3)[[0, 1, 2, 0]] * 5  # predicts 0, 1, 2, 0
    student = torch.eye(3)[[0, 0, 2, 2]] * 5  # predicts 0, 0, 2, 2
    targets = torch.tensor([0, 1, 2, 1])
    callback.on_test_epoch_start(fake_trainer(), None)
    for batch in (slice(0, 2), slice(2, 4)):  # two batches of two
        outputs = {"teacher": teacher[batch], "student": student[batch]}
        callback.on_test_batch_end(fake_trainer(), None, outputs, {"target": targets[batch]}, 0)
    # The soft-target samples: the first three, from the teacher.
    assert torch.equal(torch.cat(callback.sample_logits), teacher[:3])
    assert callback.sample_targets == [0, 1, 2]
    # Per-class accuracy over both batches: class 1's two samples are right once (teacher) or never.
    matrices = {name: metric.compute() for name, metric in callback.confusion.items()}
    assert per_class_accuracy(matrices["teacher"]).tolist() == [1.0, 0.5, 1.0]
    assert per_class_accuracy(matrices["student"]).tolist() == [1.0, 0.0, 1.0]
    callback.on_test_epoch_end(fake_trainer(), None)
    for name in TEST_FIGURES:
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def test_class_labels_are_the_names_or_the_indices():
    names = [f"class {i}" for i in range(100)]
    assert class_labels(10, names[:10]) == (list(range(10)), names[:10])
    assert class_labels(3) == ([0, 1, 2], ["0", "1", "2"])
    # Past MAX_LABELLED_CLASSES (20), every k-th class is labelled, by its own name.
    ticks, labels = class_labels(100, names)
    assert ticks == list(range(0, 100, 5)) and labels == [names[t] for t in ticks]


def tick_labels(ax, axis: str) -> list[str]:
    return [label.get_text() for label in getattr(ax, f"get_{axis}ticklabels")()]


def test_figures_name_the_classes_of_the_data(tmp_path, monkeypatch):
    """The test figures' class ticks carry the datamodule's class names (Fashion-MNIST's here)."""
    callback = PlotsCallback(tmp_path / "plots", temperatures=[1, 2], num_samples=2)
    drawn = {}
    monkeypatch.setattr(callback, "publish", lambda trainer, figures: drawn.update(figures))
    # The datamodule as a run has it: built from its config, no data read for the names.
    trainer = fake_trainer(datamodule=FashionMNISTDataModule(download=False))
    targets = torch.arange(10)
    callback.on_test_epoch_start(trainer, None)
    outputs = {"teacher": torch.eye(10) * 5, "student": torch.eye(10)[targets.roll(1)] * 5}
    callback.on_test_batch_end(trainer, None, outputs, {"target": targets}, 0)
    callback.on_test_epoch_end(trainer, None)

    confusion = [ax for ax in drawn["confusion_matrices"].axes if ax.get_title()]
    assert [ax.get_title() for ax in confusion] == ["teacher (rows normalised)", "student (rows normalised)"]
    for ax in confusion:
        assert tick_labels(ax, "x") == FASHION_MNIST_CLASSES  # predicted class
        assert tick_labels(ax, "y") == FASHION_MNIST_CLASSES  # true class
    (accuracy,) = drawn["per_class_accuracy"].axes
    assert tick_labels(accuracy, "x") == FASHION_MNIST_CLASSES
    assert "per-class accuracy" in accuracy.get_ylabel() and "per-class accuracy" in accuracy.get_title()
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["teacher", "student"]
    soft = drawn["soft_targets"].axes
    assert [ax.get_title() for ax in soft] == [
        "test sample 0 (label T-shirt/top)",
        "test sample 1 (label Trouser)",
    ]
    assert tick_labels(soft[0], "x") == FASHION_MNIST_CLASSES


def test_digits_and_data_without_names_are_labelled_by_index(tmp_path, monkeypatch):
    digits = [str(d) for d in range(10)]
    assert MNISTDataModule(download=False).class_names == digits
    for datamodule in (MNISTDataModule(download=False), None):  # None: a trainer without a datamodule
        callback = PlotsCallback(tmp_path / "plots", num_samples=1)
        drawn = {}
        monkeypatch.setattr(callback, "publish", lambda trainer, figures, drawn=drawn: drawn.update(figures))
        trainer = fake_trainer(datamodule=datamodule)
        callback.on_test_epoch_start(trainer, None)
        callback.on_test_batch_end(trainer, None, {"student": torch.eye(10)}, {"target": torch.arange(10)}, 0)
        callback.on_test_epoch_end(trainer, None)
        (accuracy,) = drawn["per_class_accuracy"].axes
        assert tick_labels(accuracy, "x") == digits


def test_agreement_is_recorded_per_training_epoch_only(tmp_path):
    callback = PlotsCallback(tmp_path / "plots")
    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    metrics = {"val/student/agreement": torch.tensor(0.25)}
    callback.on_validation_end(
        fake_trainer(sanity_checking=True, state=fitting, callback_metrics=metrics), None
    )
    for epoch, value in enumerate([0.5, 0.75]):
        metrics = {"val/student/agreement": torch.tensor(value)}
        trainer = fake_trainer(state=fitting, callback_metrics=metrics, current_epoch=epoch)
        callback.on_validation_end(trainer, None)
    validating = SimpleNamespace(fn=TrainerFn.VALIDATING)
    callback.on_validation_end(
        fake_trainer(state=validating, callback_metrics=metrics, current_epoch=2), None
    )
    assert callback.agreement == {0: 0.5, 1: 0.75}
    restored = PlotsCallback(tmp_path / "plots")
    restored.load_state_dict(callback.state_dict())
    assert restored.agreement == {0: 0.5, 1: 0.75}


def assert_run_wrote_the_pngs(mode: str, run_dir: Path, results: dict) -> None:
    plots = run_dir / "plots"
    # Only offline distillation has a teacher to agree with during validation.
    expected = {*TEST_FIGURES, *(["agreement"] if mode == "offline" else [])}
    assert {path.stem for path in plots.glob("*.png")} == expected
    for path in plots.glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path
    if mode == "offline":
        assert 0.0 <= results["metrics"]["val/student/agreement"] <= 1.0
        assert "test/student/agreement" in results["metrics"]  # the test-time metric is kept
    else:
        assert "val/student/agreement" not in results["metrics"]


@pytest.mark.parametrize("mode", ["offline", "online", "self"])
def test_every_scheme_writes_the_pngs_with_any_knowledge(mode, scheme_knowledge_sweep):
    # The jobs of the shared every-scheme multirun (tests/conftest.py), figures on.
    jobs = [job for (job_mode, _), job in scheme_knowledge_sweep.items() if job_mode == mode]
    assert len(jobs) == 3  # response, feature and relation knowledge
    for job in jobs:
        assert_run_wrote_the_pngs(mode, job, json.loads((job / "metrics.json").read_text()))


def test_a_baseline_run_writes_the_pngs(tmp_path, fashion_mnist):
    results = train(compose_config([*fast_overrides(tmp_path), "mode=baseline"]))
    assert_run_wrote_the_pngs("baseline", tmp_path / "run", results)
