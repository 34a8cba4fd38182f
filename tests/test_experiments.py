"""The CRD CIFAR-100 benchmark experiments (conf/experiment/cifar100/): protocol and end to end.

Each experiment must compose to the CRD protocol (240 epochs of SGD, momentum 0.9, weight
decay 5e-4, batch 64, lr x0.1 at 150/180/210, lr 0.05 or 0.01 for MobileNet/ShuffleNet
students) with its teacher/student pair on CIFAR-100, and must run: teacher training, then
offline KD, in-process on tiny CIFAR-100 pickles written here, for two batches.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kdlab.build import build_knowledge
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.run import train
from kdlab.schemes import Offline
from tests.conftest import CONF, NO_PLOTS, compose_config, fast_overrides
from tests.test_data import write_cifar

# experiment -> (teacher, student, learning rate)
EXPERIMENTS = {
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 0.05),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2", 0.05),
    "resnet56_resnet20": ("resnet56", "resnet20", 0.05),
    "vgg13_vgg8": ("vgg13", "vgg8", 0.05),
    "resnet110_resnet32": ("resnet110", "resnet32", 0.05),
    "resnet32x4_shufflev2": ("resnet32x4", "shufflev2", 0.01),
}
EXPERIMENT_DIR = CONF / "experiment" / "cifar100"


def test_every_cifar100_experiment_is_tested():
    assert {p.stem for p in EXPERIMENT_DIR.glob("*.yaml")} == set(EXPERIMENTS)
    for path in EXPERIMENT_DIR.glob("*.yaml"):
        header = path.read_text().splitlines()
        assert header[0] == "# @package _global_" and header[1].startswith("# CRD benchmark"), path


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_to_the_crd_protocol(name):
    teacher, student, lr = EXPERIMENTS[name]
    cfg = compose_config([f"experiment=cifar100/{name}"])
    assert cfg.data._target_ == "kdlab.data.CIFAR100DataModule"
    assert cfg.data.batch_size == 64
    assert (cfg.teacher.name, cfg.student.name) == (teacher, student)
    assert cfg.teacher.num_classes == cfg.student.num_classes == 100 and cfg.student.input_size == 32
    assert cfg.trainer.max_epochs == 240 and cfg.trainer.limit_train_batches is None
    # The teacher, when kdlab trains it, follows the same protocol.
    assert cfg.teacher_training.trainer.max_epochs == 240
    assert cfg.teacher_training.optimizer.lr == 0.05  # CRD trains every teacher at 0.05
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (lr, 0.9, 5e-4)
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    assert cfg.mode._target_ == "kdlab.schemes.Offline"
    # Knowledge is the user's choice; the command line still overrides the experiment.
    chosen = compose_config([f"experiment=cifar100/{name}", "knowledge=kd", "optimizer.lr=0.1"])
    assert list(chosen.knowledge) == ["kd"] and chosen.optimizer.lr == 0.1


@pytest.fixture(scope="module")
def tiny_cifar100(tmp_path_factory):
    """60 train and 20 test images in the CIFAR-100 pickle layout (cifar-100-python/train, test)."""
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar(root / "cifar-100-python", hundred=True)
    return root


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_trains_teacher_then_distils(name, tmp_path, tiny_cifar100):
    teacher, student, _ = EXPERIMENTS[name]
    overrides = [
        f"experiment=cifar100/{name}",
        *(o for o in fast_overrides(tmp_path) if not o.startswith("data.batch_size")),
        f"data.root={tiny_cifar100}",
        "data.val_size=8",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        # One evaluation batch and no sanity check: evaluation is half of a run's time otherwise.
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        # 100-class confusion matrices and per-class bars cost more than the run; tests/test_plots.py
        # checks the figures.
        NO_PLOTS,
    ]
    results = train(compose_config(overrides))
    assert results["mode"] == "offline" and results["knowledge"] == ["kd"]
    assert results["teacher"]["source"] == "trained"
    rows = {row["model"]: row for row in results["models"]}
    assert (rows["teacher"]["architecture"], rows["student"]["architecture"]) == (teacher, student)
    student_params = sum(p.numel() for p in create_model(student, num_classes=100).parameters())
    assert rows["student"]["params"] == student_params
    for row in rows.values():
        assert 0.0 <= row["test top-1"] <= 1.0
    assert math.isfinite(results["metrics"]["train/kd_epoch"])
    assert results["optimized_metric"]["value"] is not None


def test_both_resnet32x4_pairs_share_one_stored_teacher(tmp_path):
    from kdlab.store import content_key
    from kdlab.teachers import teacher_spec

    keys = {
        content_key(
            teacher_spec(compose_config([f"experiment=cifar100/{name}", f"paths.output_dir={tmp_path}"]))
        )
        for name in ("resnet32x4_resnet8x4", "resnet32x4_shufflev2")
    }
    assert len(keys) == 1


KNOWLEDGE = sorted(p.stem for p in (CONF / "knowledge").glob("*.yaml"))


@pytest.mark.parametrize("knowledge", KNOWLEDGE)
def test_every_knowledge_composes_with_the_cifar_experiment_and_keeps_its_recipe(knowledge):
    # The experiment sets the pair, the data and the optimisation protocol; the method's recipe
    # (weights, temperatures, layers; DOT's optimizer) is the knowledge config's, unchanged.
    alone = compose_config([f"knowledge={knowledge}"])
    cfg = compose_config(["experiment=cifar100/resnet32x4_resnet8x4", f"knowledge={knowledge}"])
    assert cfg.knowledge == alone.knowledge and cfg.dot == alone.dot
    assert (cfg.teacher.name, cfg.student.name, cfg.data.num_classes) == ("resnet32x4", "resnet8x4", 100)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.05
    # Every method builds on the benchmark pair (its adapters from the real shapes at 3x32x32), except
    # DeiT's, which trains a distillation token the pair's CNN student does not have, and MiniLM's, which
    # reads a language model's self-attention: refused, saying so.
    refusals = {
        "deit": "it has no distillation token",
        "minilm": "reads the self-attention of a language model",
    }
    refusals["deit_soft"] = refusals["deit"]
    if knowledge in refusals:
        with pytest.raises(KdlabError, match=refusals[knowledge]):
            Offline(
                teacher=create_model("resnet32x4", num_classes=100),
                student=create_model("resnet8x4", num_classes=100),
                optimizer=partial(torch.optim.SGD, lr=0.05),
                num_classes=100,
                input_shape=(3, 32, 32),
                knowledge=build_knowledge(cfg),
            )
        return
    scheme = Offline(
        teacher=create_model("resnet32x4", num_classes=100),
        student=create_model("resnet8x4", num_classes=100),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=100,
        input_shape=(3, 32, 32),
        knowledge=build_knowledge(cfg),
        num_samples=50_000,
    )
    assert list(scheme.knowledge) == list(cfg.knowledge)


def test_tutorial_experiment_is_the_pytorch_tutorials_recipe():
    """experiment=tutorial: the PyTorch KD tutorial's train_knowledge_distillation() arguments."""
    cfg = compose_config(["experiment=tutorial"])
    assert (cfg.teacher.name, cfg.student.name) == ("deepnn", "lightnn")
    assert cfg.knowledge.kd.temperature == 2.0  # T=2
    assert cfg.knowledge.kd.weight == 0.25 and cfg.mode.task_weight == 0.75  # soft 0.25, CE 0.75
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.limit_train_batches is None
    assert cfg.teacher_training.trainer.max_epochs == 10  # the teacher trains 10 epochs too
    assert list(cfg.data.train_transforms) == []  # the tutorial normalises only
    assert cfg.optimizer.lr == 1e-3 and cfg.data.batch_size == 128
