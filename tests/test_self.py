"""Self-distillation: BYOT's exits, PS-KD's past predictions, Born-Again's generations."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kdlab.build import build_knowledge, scheme_class
from kdlab.errors import KdlabError
from kdlab.loggers import run_tags
from kdlab.models import create_model
from kdlab.run import train
from kdlab.schemes import BYOT, PSKD
from tests.conftest import NO_PLOTS, compose_config, fast_overrides


def resnet8():
    return create_model("resnet8", num_classes=10, in_channels=1, input_size=28)


def scheme(cls, tmp_path, knowledge="byot", **kwargs):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=self", f"knowledge={knowledge}"])
    return cls(
        student=resnet8(),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge=build_knowledge(cfg),
        num_samples=64,
        **kwargs,
    )


def batch(n=8):
    return {"input": torch.randn(n, 1, 28, 28), "target": torch.arange(n) % 10, "index": torch.arange(n)}


def test_mode_self_defaults_to_byot_with_its_recipe(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=self"])
    assert cfg.mode._target_ == "kdlab.schemes.BYOT" and list(cfg.knowledge) == ["kd", "l2"]
    assert (cfg.knowledge.kd.temperature, cfg.knowledge.kd.weight, cfg.knowledge.l2.weight) == (
        3.0,
        0.3,
        0.03,
    )
    assert scheme(BYOT, tmp_path).task_weight == pytest.approx(0.7)


def test_byot_exits_and_backbone_all_get_gradients(tmp_path):
    byot = scheme(BYOT, tmp_path)
    byot.log_terms = lambda terms, loss: None
    byot.training_step(batch(), 0).backward()
    assert set(byot.knowledge) == {"exit1", "exit2"}
    for name, p in [*byot.student.named_parameters(), *byot.exits.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_byot_deepest_exit_teaches_without_receiving_gradient_from_the_exits(tmp_path):
    byot = scheme(BYOT, tmp_path)
    outputs = byot.exit_outputs(batch()["input"])
    term = byot.knowledge["exit1"]["kd"]
    term(outputs["exit1"], outputs["student"].detach(), batch()).backward()
    assert all(p.grad is None for p in byot.student.fc.parameters())  # the deepest head is the teacher


def test_dropping_the_exits_leaves_the_final_predictions_unchanged(tmp_path):
    byot = scheme(BYOT, tmp_path).eval()
    x = batch()["input"]
    with torch.no_grad():
        with_exits = byot.exit_outputs(x)["student"].logits
        deployed = resnet8()
        deployed.load_state_dict(byot.student.state_dict())  # the backbone alone, no exit weights
        assert torch.equal(deployed.eval()(x), with_exits)
    assert not any(key.startswith("exits") for key in byot.student.state_dict())


def test_pskd_targets_are_the_previous_epochs_predictions_by_index(tmp_path):
    pskd = scheme(PSKD, tmp_path, knowledge="dml")
    pskd.log_terms = lambda terms, loss: None
    pskd.log = lambda *args, **kwargs: None
    pskd.trainer = type(
        "T", (), {"max_epochs": 3, "current_epoch": 0, "global_step": 0}
    )()  # what PS-KD reads
    b = batch()
    with torch.no_grad():
        loss0 = pskd.training_step(b, 0)  # epoch 0: alpha = 0, plain cross-entropy
        logits0 = pskd.student(b["input"])
    assert loss0.item() == pytest.approx(F.cross_entropy(logits0, b["target"]).item(), rel=1e-5)
    stored, known = pskd.bank.previous(b["index"], epoch=1)
    assert known.all()
    assert torch.allclose(stored, logits0.softmax(dim=1), atol=1e-6)
    unseen, unknown = pskd.bank.previous(torch.tensor([40, 41]), epoch=1)
    assert not unknown.any()


def test_pskd_refuses_feature_knowledge(tmp_path):
    with pytest.raises(KdlabError, match="mode=pskd .* knowledge.l2 reads"):
        scheme(PSKD, tmp_path, knowledge="byot")


@pytest.mark.parametrize(
    ("mode", "name"),
    [
        ("self", "byot"),
        ("byot", "byot"),
        ("pskd", "pskd"),
        ("born_again", "born_again"),
        ("cskd", "cskd"),
        ("tfkd", "tfkd"),
    ],
)
def test_each_self_distillation_method_is_its_own_scheme(mode, name, tmp_path):
    # metrics.json and the logger tags name the method, not the family.
    cfg = compose_config([*fast_overrides(tmp_path), f"mode={mode}"])
    assert scheme_class(cfg).name == name and run_tags(cfg)[0] == f"mode:{name}"


def test_born_again_generation_k_is_taught_by_generation_k_minus_1(tmp_path, fashion_mnist):
    overrides = [
        *fast_overrides(tmp_path),
        "mode=born_again",
        "mode.generations=2",
        "knowledge=kd",
        "model@student=resnet8",
        NO_PLOTS,  # self mode's figures: tests/test_plots.py
        # A pretrained teacher's budget (the default job's trains longer): not a generation's.
        "teacher_training.trainer.max_epochs=4",
    ]
    first = train(compose_config(overrides))
    assert [row["model"] for row in first["models"]] == ["gen0", "teacher", "student"]
    assert {row["architecture"] for row in first["models"]} == {"resnet8"}
    entries = {
        json.loads(p.read_text())["spec"].get("born_again", {}).get("generation", 0): p.parent
        for p in (tmp_path / "teachers").glob("*/meta.json")
    }
    assert sorted(entries) == [0, 1]
    for entry in entries.values():  # every generation is trained as the student is (Sec. 3)
        assert json.loads((entry / "meta.json").read_text())["spec"]["trainer"]["max_epochs"] == 1
    gen1 = json.loads((entries[1] / "meta.json").read_text())["spec"]["born_again"]
    assert gen1["teacher"] == entries[0].name.rsplit("-", 1)[1]  # keyed by generation 0's key
    assert first["teacher"]["path"] == str(entries[1] / "teacher.pt")  # the run's teacher is gen 1
    # Interrupted or repeated: every generation comes back from the store.
    again = train(compose_config([*overrides, f"paths.output_dir={tmp_path / 'again'}"]))
    assert again["teacher"]["source"] == "store"


def test_a_byot_run_saves_the_backbone_without_exits(tmp_path, fashion_mnist):
    overrides = [*fast_overrides(tmp_path), "mode=self", "model@student=resnet8", NO_PLOTS]
    result = train(compose_config(overrides))
    saved = torch.load(result["student_weights"], weights_only=True)
    assert not any("exit" in key for key in saved["state_dict"])
    model = create_model(
        "resnet8", num_classes=10, in_channels=1, input_size=28, checkpoint=result["student_weights"]
    )
    assert {row["model"] for row in result["models"]} == {"student", "exit1", "exit2", "exits_ensemble"}
    assert isinstance(model, torch.nn.Module)
