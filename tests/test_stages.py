"""Stages before the main fit (kdlab.stages): they run, are reported, and resuming does not repeat them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.knowledge import Knowledge, Stage
from kdlab.run import train
from kdlab.stages import StageFit
from tests.conftest import NO_PLOTS, compose_config, fast_overrides


class StagedLoss(Knowledge):
    """A loss with one stage that trains the student and a projection towards the teacher's logits."""

    key = "staged"

    def __init__(self, epochs: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs
        self.projection = nn.Linear(10, 10)

    def stages(self):
        return [Stage("warmup", self.epochs, trains_student=True, lr=0.01)]

    def stage_loss(self, stage, student, source, batch, context=None):
        return F.mse_loss(self.projection(student.logits), source.logits.detach())

    def forward(self, student, source, batch, context=None):
        return F.mse_loss(self.projection(student.logits), source.logits.detach())


def overrides(tmp_path, teacher_store, *extra):
    return [
        *fast_overrides(tmp_path, 2, teacher_store),
        "+knowledge.staged={_target_: tests.test_stages.StagedLoss}",
        NO_PLOTS,
        *extra,
    ]


@pytest.fixture
def count_stage_steps(monkeypatch):
    calls = []
    step = StageFit.training_step

    def counted(self, batch, batch_idx):
        calls.append(batch_idx)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(StageFit, "training_step", counted)
    return calls


def test_a_stage_runs_before_the_main_fit_and_is_reported(
    tmp_path, fashion_mnist, teacher_store, count_stage_steps
):
    result = train(compose_config(overrides(tmp_path, teacher_store)))
    assert len(count_stage_steps) == 2 * 2  # 2 epochs of 2 batches (trainer.limit_train_batches applies)
    [stage] = result["stages"]
    assert (stage["knowledge"], stage["stage"], stage["epochs"]) == ("staged", "warmup", 2)
    assert math.isfinite(stage["final_loss"])
    folder = tmp_path / "run" / "stages" / "staged-warmup"
    assert json.loads((folder / "result.json").read_text()) == stage
    assert (folder / "weights.pt").is_file() and (folder / "last.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"] == [stage]


def test_resuming_does_not_repeat_a_finished_stage(tmp_path, fashion_mnist, teacher_store, count_stage_steps):
    first = train(compose_config(overrides(tmp_path, teacher_store)))
    run = tmp_path / "run"
    weights = torch.load(run / "stages" / "staged-warmup" / "weights.pt", weights_only=True)
    # Stopped after the stage, before the main fit saved anything: the stage's result is reused.
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()
    (run / "metrics.json").unlink()
    count_stage_steps.clear()
    loaded = []
    original = torch.nn.Module.load_state_dict

    def spy(module, state, *args, **kwargs):
        loaded.append(dict(state))
        return original(module, state, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "load_state_dict", spy)
        second = train(compose_config(overrides(tmp_path, teacher_store, "ckpt_path=last")))
    assert count_stage_steps == []
    assert second["stages"] == first["stages"]
    # The scheme was given the stage's weights before the main fit.
    assert any(
        state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
        for state in loaded
    )

    # Stopped inside the stage: it continues from its own last.ckpt (here after its last epoch).
    for name in ("result.json", "weights.pt"):
        (run / "stages" / "staged-warmup" / name).unlink()
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()
    (run / "metrics.json").unlink()
    third = train(compose_config(overrides(tmp_path, teacher_store, "ckpt_path=last")))
    assert count_stage_steps == []  # its two epochs were done; the checkpoint said so
    assert third["stages"][0]["stage"] == "warmup"
    assert (run / "stages" / "staged-warmup" / "result.json").is_file()


def test_a_stage_in_online_mode_is_a_clear_error(tmp_path, fashion_mnist, teacher_store):
    from kdlab.errors import KdlabError

    with pytest.raises(KdlabError, match="runs a stage before the main fit.*mode=offline"):
        train(compose_config(overrides(tmp_path, teacher_store, "mode=online", "knowledge=dml")))


def test_a_run_started_from_a_checkpoint_does_not_run_the_stages(
    tmp_path, fashion_mnist, teacher_store, count_stage_steps
):
    train(compose_config(overrides(tmp_path / "first", teacher_store)))
    count_stage_steps.clear()
    # The checkpoint holds what the stage trained; a new run from it starts with the main fit.
    checkpoint = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"
    second = overrides(
        tmp_path / "second",
        teacher_store,
        f"ckpt_path={checkpoint}",
        "trainer.max_epochs=2",
        "teacher_training.trainer.max_epochs=1",
    )
    result = train(compose_config(second))
    assert count_stage_steps == [] and result["stages"] == []
