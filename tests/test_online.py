"""Online distillation: peers learn from each other, never through each other's gradients."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from kdlab.build import build_knowledge
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.schemes import Online
from tests.conftest import compose_config, fast_overrides


def model(name: str):
    return create_model(name, num_classes=10, in_channels=1, input_size=28)


def online(tmp_path, knowledge="dml", extra_peers=(), **kwargs) -> Online:
    cfg = compose_config([*fast_overrides(tmp_path), "mode=online", f"knowledge={knowledge}"])
    return Online(
        student=model("lightnn"),
        teacher=model("resnet8"),
        extra_peers=[model(name) for name in extra_peers],
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge=build_knowledge(cfg),
        **kwargs,
    )


def batch(n=8):
    return {"input": torch.randn(n, 1, 28, 28), "target": torch.arange(n) % 10, "index": torch.arange(n)}


@pytest.fixture()
def datamodule(tmp_path, fashion_mnist):
    return instantiate(compose_config(fast_overrides(tmp_path)).data)


def fit(scheme, datamodule, **trainer_args):
    args = dict(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = L.Trainer(**{**args, **trainer_args})
    trainer.fit(scheme, datamodule=datamodule)
    return trainer


def test_mode_online_defaults_to_deep_mutual_learning_and_takes_any_knowledge(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=online"])
    assert list(cfg.knowledge) == ["dml"] and cfg.knowledge.dml.temperature == 1.0
    assert cfg.mode._target_ == "kdlab.schemes.Online" and cfg.mode.target == "peers"
    assert list(
        compose_config([*fast_overrides(tmp_path), "mode=online", "knowledge=feature"]).knowledge
    ) == ["fitnet"]


def test_every_peer_learns(tmp_path, datamodule):
    scheme = online(tmp_path)
    before = {name: [p.clone() for p in peer.parameters()] for name, peer in scheme.peers.items()}
    trainer = fit(scheme, datamodule)
    for name, peer in scheme.peers.items():
        assert any(not torch.equal(a, b) for a, b in zip(peer.parameters(), before[name], strict=True)), name
    for name in ("teacher", "student", "ensemble"):
        assert f"val/{name}/top1" in trainer.callback_metrics
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in scheme.peers.parameters()} | {
        id(p) for p in scheme.knowledge.parameters()
    }


def test_a_peers_knowledge_term_sends_no_gradient_to_its_source(tmp_path):
    scheme = online(tmp_path)
    outputs = scheme.forward_peers(batch()["input"])
    source = scheme.source_outputs(outputs, "teacher")
    assert not source.logits.requires_grad
    term = scheme.knowledge["student"]["teacher"]["dml"]
    term(outputs["student"], source, batch()).backward()
    assert all(p.grad is None for p in scheme.peers["teacher"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme.peers["student"].parameters())


def test_dml_loss_is_task_plus_mean_kl_to_the_other_peers(tmp_path):
    scheme = online(tmp_path, extra_peers=["resnet8"]).eval()  # no dropout: two passes must agree
    b = batch()
    outputs = scheme.forward_peers(b["input"])
    logged = {}
    scheme.log_terms = lambda terms, loss: logged.update(terms=terms, loss=loss)
    loss = scheme.training_step(b, 0)
    kl = lambda s, t: torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")  # noqa: E731
    expected = 0.0
    for learner, out in outputs.items():
        others = [kl(out.logits, o.logits.detach()) for name, o in outputs.items() if name != learner]
        expected += torch.nn.functional.cross_entropy(out.logits, b["target"]) + sum(others) / len(others)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logged["terms"]) == {
        f"{p}/{t}" for p in ("teacher", "student", "peer3") for t in ("task", "dml")
    }


def test_three_peers_get_adapters_in_every_direction(tmp_path):
    scheme = online(tmp_path, knowledge="fitnet", extra_peers=["resnet8x4"])
    directions = {(learner, source) for learner, d in scheme.knowledge.items() for source in d}
    assert directions == {
        (a, b) for a in ("teacher", "student", "peer3") for b in ("teacher", "student", "peer3") if a != b
    }
    # resnet8 (stage2: 32 channels) learning from resnet8x4 (stage2: 128 channels), and back.
    forward = scheme.knowledge["teacher"]["peer3"]["fitnet"]
    backward = scheme.knowledge["peer3"]["teacher"]["fitnet"]
    convs = lambda term: [m for m in term.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert (convs(forward)[0].in_channels, convs(forward)[0].out_channels) == (32, 128)
    assert (convs(backward)[0].in_channels, convs(backward)[0].out_channels) == (128, 32)


def test_ensemble_target_teaches_each_peer_the_mean_logits(tmp_path):
    scheme = online(tmp_path, target="ensemble")
    assert {source for d in scheme.knowledge.values() for source in d} == {"ensemble"}
    outputs = scheme.forward_peers(batch()["input"])
    mean = torch.stack([o.logits for o in outputs.values()]).mean(0)
    assert torch.allclose(scheme.source_outputs(outputs, "ensemble").logits, mean)
    with pytest.raises(KdlabError, match="mode.target=ensemble .* knowledge.fitnet reads"):
        online(tmp_path, knowledge="fitnet", target="ensemble")
    with pytest.raises(KdlabError, match="mode.target='both'"):
        online(tmp_path, target="both")


def test_clipping_accumulation_and_schedulers_work(tmp_path, datamodule):
    scheme = online(tmp_path, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1))
    trainer = fit(scheme, datamodule, max_epochs=2, gradient_clip_val=0.5, accumulate_grad_batches=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.1**2)
    assert trainer.global_step == 4  # 2 epochs x ceil(3 batches / 2)


def test_online_runs_under_ddp_on_two_cpu_processes(tmp_path, datamodule):
    scheme = online(tmp_path)
    trainer = fit(scheme, datamodule, strategy="ddp_spawn", devices=2, limit_train_batches=2)
    assert trainer.world_size == 2
    assert "val/student/top1" in trainer.callback_metrics
