"""Every reported metric, recomputed from the saved weights with plain PyTorch, outside kdlab's metrics.

The results table promises fractions of samples: top-1 is the fraction of test images whose top
class is the label, agreement the fraction on which the student's top class is the teacher's.
These tests load `student.pt` and the teacher a run used, run them over kdlab's own test (and
validation) loader, count, and compare with what the run wrote to metrics.json. A per-class
(macro) average, torchmetrics' default, differs from these counts on any unbalanced subset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdlab.build import instantiate
from kdlab.models import create_model
from kdlab.run import train
from tests.conftest import NO_PLOTS, compose_config, fast_overrides


def loader_batches(cfg, stage: str, limit: int):
    """The first `limit` batches kdlab's datamodule gives for `stage` ("test" or "validate")."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup(stage)
    loader = datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()
    for i, batch in enumerate(loader):
        if i == limit:
            break
        yield batch["input"], batch["target"]


def load(architecture: str, weights: str | Path, cfg) -> torch.nn.Module:
    data = cfg.data
    model = create_model(
        architecture,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
        checkpoint=str(weights),
    )
    return model.eval()


@torch.no_grad()
def counted(student, teacher, batches) -> dict[str, float]:
    """Top-1 of both models and the student's agreement with the teacher, as fractions of samples."""
    correct_s = correct_t = agree = total = 0
    for x, y in batches:
        s, t = student(x).argmax(1), teacher(x).argmax(1) if teacher is not None else None
        correct_s += int((s == y).sum())
        total += len(y)
        if teacher is not None:
            correct_t += int((t == y).sum())
            agree += int((s == t).sum())
    return {"student": correct_s / total, "teacher": correct_t / total, "agreement": agree / total}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, fashion_mnist, teacher_store):
    """A short offline KD run of the default pair, tested on 3 batches of 128 (a subset, where
    a per-class average and the fraction of samples differ), validated on 2."""
    tmp_path = tmp_path_factory.mktemp("recomputed")
    overrides = [
        *fast_overrides(tmp_path, batches=5, teacher_store=teacher_store),
        "data.batch_size=128",
        "trainer.limit_test_batches=3",
        "trainer.limit_val_batches=2",
        NO_PLOTS,
    ]
    cfg = compose_config(overrides)
    return cfg, train(cfg)


def test_offline_top1_and_agreement_are_fractions_of_test_images(offline_run):
    cfg, results = offline_run
    student = load(cfg.student.name, results["student_weights"], cfg)
    teacher = load(cfg.teacher.name, results["teacher"]["path"], cfg)
    expected = counted(student, teacher, loader_batches(cfg, "test", 3))
    written = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())["metrics"]
    assert written["test/student/top1"] == pytest.approx(expected["student"], abs=1e-6)
    assert written["test/teacher/top1"] == pytest.approx(expected["teacher"], abs=1e-6)
    assert written["test/student/agreement"] == pytest.approx(expected["agreement"], abs=1e-6)
    rows = {row["model"]: row for row in results["models"]}
    assert rows["student"]["agreement"] == pytest.approx(expected["agreement"], abs=1e-6)


def test_validation_top1_and_agreement_are_fractions_too(offline_run):
    # One epoch: the tested weights (the best checkpoint) are the last validated ones.
    cfg, results = offline_run
    student = load(cfg.student.name, results["student_weights"], cfg)
    teacher = load(cfg.teacher.name, results["teacher"]["path"], cfg)
    expected = counted(student, teacher, loader_batches(cfg, "validate", 2))
    assert results["metrics"]["val/student/top1"] == pytest.approx(expected["student"], abs=1e-6)
    assert results["metrics"]["val/student/agreement"] == pytest.approx(expected["agreement"], abs=1e-6)


def test_every_schemes_student_top1_is_the_fraction_its_saved_weights_score(scheme_knowledge_sweep):
    # Online and self mode too: student.pt is the deployable student (no peers, no exits).
    assert scheme_knowledge_sweep, "the every-scheme sweep produced no job"
    for (mode, knowledge), job in scheme_knowledge_sweep.items():
        cfg = compose_config_of(job)
        written = json.loads((job / "metrics.json").read_text())
        student = load(cfg.student.name, written["student_weights"], cfg)
        limit = cfg.trainer.limit_test_batches
        expected = counted(student, None, loader_batches(cfg, "test", limit))["student"]
        assert written["metrics"]["test/student/top1"] == pytest.approx(expected, abs=1e-6), (mode, knowledge)


def compose_config_of(job: Path):
    """The composed config a job ran with, as Hydra saved it."""
    return OmegaConf.load(job / ".hydra" / "config.yaml")
