"""Every knowledge config in the online and self-distillation schemes: it trains, or says why it cannot."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kdlab.build import build_knowledge
from kdlab.data.datasets import view_key
from kdlab.errors import KdlabError
from kdlab.knowledge import views_of
from kdlab.models import create_model
from kdlab.schemes import BYOT, Online
from tests.conftest import CONF, compose_config, fast_overrides

KNOWLEDGE = sorted(p.stem for p in (CONF / "knowledge").glob("*.yaml"))


def model(name):
    return create_model(name, num_classes=10, in_channels=1, input_size=28)


def build(mode, knowledge):
    common = dict(
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge=knowledge,
        num_samples=64,
    )
    if mode == "online":
        return Online(student=model("resnet8"), teacher=model("resnet14"), **common)
    return BYOT(student=model("resnet8"), **common)


@pytest.mark.parametrize("mode", ["online", "byot"])
@pytest.mark.parametrize("name", KNOWLEDGE)
def test_each_knowledge_trains_in_the_scheme_or_explains_why_not(name, mode, tmp_path):
    torch.manual_seed(0)
    knowledge = build_knowledge(compose_config([*fast_overrides(tmp_path), f"knowledge={name}"]))
    batch = {"input": torch.randn(8, 1, 28, 28), "target": torch.arange(8) % 10, "index": torch.arange(8)}
    batch.update({view_key(view): torch.randn(8, 1, 28, 28) for view in views_of(knowledge.values())})
    try:
        scheme = build(mode, knowledge)
        if any(term.stages() for term in knowledge.values()):
            scheme.stage_outputs(batch)  # what kdlab.stages asks first
        loss = scheme.training_step(batch, 0)
    except KdlabError as error:
        # A clear refusal names the scheme it cannot work in, or what it would need instead.
        message = str(error)
        assert "mode" in message and len(message) > 80, message
        return
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    trained = [p for m in scheme.trained_models().values() for p in m.parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("name", ["simkd", "mlkd", "ab", "ft"])
def test_born_again_generations_refuse_losses_a_stored_model_cannot_carry(name, tmp_path):
    from kdlab.teachers import refuse_for_generations

    knowledge = build_knowledge(compose_config([*fast_overrides(tmp_path), f"knowledge={name}"]))
    with pytest.raises(KdlabError, match=rf"mode=born_again .* knowledge\.{name} needs"):
        refuse_for_generations(knowledge)
    refuse_for_generations(build_knowledge(compose_config([*fast_overrides(tmp_path), "knowledge=kd"])))


def test_pskd_refuses_a_loss_that_reads_extra_views(tmp_path):
    from kdlab.schemes import PSKD

    knowledge = build_knowledge(compose_config([*fast_overrides(tmp_path), "knowledge=mlkd"]))
    with pytest.raises(KdlabError, match=r"mode=pskd .* knowledge\.mlkd compares predictions on extra views"):
        PSKD(
            student=model("resnet8"),
            optimizer=partial(torch.optim.SGD, lr=0.05),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge=knowledge,
            num_samples=64,
        )
