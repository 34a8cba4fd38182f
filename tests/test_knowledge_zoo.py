"""Every knowledge config, in the real scheme: gradients, composition, and a CLI training run."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

from kdlab.build import build_knowledge
from kdlab.data.datasets import view_key
from kdlab.knowledge import views_of
from kdlab.models import create_model
from kdlab.run import train
from kdlab.schemes import Offline
from tests.conftest import (
    CONF,
    NO_PLOTS,
    compose_config,
    fast_overrides,
    run_cli,
    sweep_overrides,
)

KNOWLEDGE = sorted(p.stem for p in (CONF / "knowledge").glob("*.yaml"))
# FSP compares flow matrices and the L2 hint raw feature maps: both need equal stage shapes,
# which the tutorial pair does not have; OFD and ReviewKD read pre-activation taps, which it lacks.
SAME_WIDTH_PAIR = ["model@teacher=resnet14", "model@student=resnet8"]
# The family defaults (response: kd, feature: fitnet, relation: rkd) train offline through the CLI
# in tests/test_run.py's every-scheme multirun, which checks what they stand for.
FAMILY_DEFAULTS = ("response", "feature", "relation")
# DeiT trains the student's distillation token, which only a distilled ViT has: these get a tiny one
# here, and train through the CLI with it in tests/test_knowledge_deit_ofa.py and the README's commands.
DISTILLATION_TOKEN = ("deit", "deit_soft")
# MiniLM reads a language model's self-attention: it is tested on LMs (tests/test_lm_schemes.py, and through
# the CLI in tests/test_lm_runs.py), and an image model is refused (tests/test_lm_schemes.py).
LANGUAGE_MODEL = ("minilm",)
TINY_DISTILLED_DEIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 4}


def scheme_for(name: str, tmp_path) -> Offline:
    cfg = compose_config([*fast_overrides(tmp_path), f"knowledge={name}", *SAME_WIDTH_PAIR])
    return Offline(
        teacher=create_model("resnet14", num_classes=10, in_channels=1, input_size=28),
        student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28)
        if name not in DISTILLATION_TOKEN
        else create_model("timm/deit_tiny_distilled_patch16_224", 10, 1, 28, **TINY_DISTILLED_DEIT),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge=build_knowledge(cfg),
        num_samples=100,
    )


@pytest.mark.parametrize("name", [name for name in KNOWLEDGE if name not in LANGUAGE_MODEL])
def test_gradients_reach_the_student_and_every_adapter_never_the_teacher(name, tmp_path):
    torch.manual_seed(0)
    scheme = scheme_for(name, tmp_path)
    batch = {"input": torch.randn(8, 1, 28, 28), "target": torch.arange(8) % 10, "index": torch.arange(8)}
    batch.update({view_key(view): torch.randn(8, 1, 28, 28) for view in views_of(scheme.knowledge.values())})
    student, source = scheme.stage_outputs(batch)  # the student's and the source's outputs, views included
    terms = scheme.loss_terms(student, source, batch)
    for term_name, value in terms.items():
        assert value.ndim == 0 and math.isfinite(value.item()), term_name
    scheme.weighted_sum(terms).backward()
    assert all(p.grad is None for p in scheme.teacher.parameters())
    assert sum(p.grad.abs().sum() for p in scheme.student.parameters() if p.grad is not None) > 0
    # What only a loss's stage trains (AB's connectors, FT's paraphraser) is fixed in the main fit.
    stage_only = {id(p) for module in scheme.stage_only_modules() for p in module.parameters()}
    assert not stage_only & {id(p) for p in scheme.trainable_parameters()}
    for param_name, p in scheme.knowledge.named_parameters():
        if id(p) not in stage_only:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {param_name} got no gradient"


@pytest.mark.parametrize("combo", [["kd", "at"], ["kd", "crd"]])
def test_composed_knowledge_trains_with_each_term_logged(combo, tmp_path, fashion_mnist, teacher_store):
    # The teacher: the session's (tests/conftest.py), trained once for every run of this budget.
    overrides = [*fast_overrides(tmp_path, teacher_store=teacher_store), f"knowledge=[{','.join(combo)}]"]
    overrides.append(NO_PLOTS)
    if "crd" in combo:
        # CRD's default 16384 negatives per sample make each step score 32 x 16385 embeddings;
        # composition does not depend on how many.
        overrides.append("knowledge.crd.num_negatives=64")
    result = train(compose_config(overrides))
    assert result["knowledge"] == combo
    for name in ("task", *combo):
        assert math.isfinite(result["metrics"][f"train/{name}_epoch"]), name


def test_every_knowledge_config_trains_offline_through_the_cli(tmp_path, fashion_mnist, teacher_store):
    names = [name for name in KNOWLEDGE if name not in FAMILY_DEFAULTS + DISTILLATION_TOKEN + LANGUAGE_MODEL]
    sweep = tmp_path / "sweep"
    # Each knowledge config as it is (CRD with its 16384 negatives, AB's and FT's stages too), on a
    # pair of CIFAR ResNets, which have what every method reads: stages of equal widths (FSP, L2),
    # pre-activation taps (OFD, ReviewKD) and a linear head (SRD, SimKD, SDD). The figures, which do
    # not depend on the knowledge, are left to tests/test_plots.py.
    args = [*sweep_overrides(tmp_path, batches=2, teacher_store=teacher_store), *SAME_WIDTH_PAIR, NO_PLOTS]
    proc = run_cli(
        ["-m", *args, f"hydra.sweep.dir={sweep}", f"knowledge={','.join(names)}"], cwd=tmp_path, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {name: json.loads((sweep / str(i) / "metrics.json").read_text()) for i, name in enumerate(names)}
    for name, result in runs.items():
        trained = [
            key.removeprefix("train/").removesuffix("_epoch")
            for key in result["metrics"]
            if key.endswith("_epoch")
        ]
        assert set(trained) > {"task", "loss"}, (name, trained)
        assert all(math.isfinite(result["metrics"][f"train/{term}_epoch"]) for term in trained), name
        assert 0 <= result["metrics"]["test/student/top1"] <= 1, name
        assert all(math.isfinite(stage["final_loss"]) for stage in result["stages"]), name
