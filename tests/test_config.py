"""Every config of every group composes, and instantiates into the object it names."""

from __future__ import annotations

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kdlab.build import build_callbacks, build_knowledge, build_model, build_trainer, optimisation
from kdlab.knowledge import KD, Knowledge
from kdlab.loggers import build_loggers
from kdlab.schemes import Baseline, Offline
from tests.conftest import CONF, compose_config, fast_overrides


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_job_is_offline_kd_on_fashion_mnist():
    cfg = compose_config([])
    assert cfg.mode._target_ == "kdlab.schemes.Offline"
    # Hinton KD at T=1, CE and KD weighted 1 (knowledge=response; the README measures why this recipe)
    kd = cfg.knowledge.kd
    assert list(cfg.knowledge) == ["kd"] and (kd.temperature, kd.weight, kd.task_weight) == (1.0, 1.0, 1.0)
    assert compose_config(["knowledge=kd"]).knowledge.kd.temperature == 4.0  # kd itself: the CIFAR recipe
    # The teacher trains 6 epochs to the student's 2, both of 100 batches (experiment=quickstart).
    assert (cfg.trainer.max_epochs, cfg.trainer.limit_train_batches) == (2, 100)
    assert cfg.teacher_training.trainer.max_epochs == 6
    assert cfg.data._target_.endswith("FashionMNISTDataModule")
    assert (cfg.teacher.name, cfg.student.name) == ("deepnn", "lightnn")
    assert cfg.teacher.num_classes == cfg.student.num_classes == 10 and cfg.student.in_channels == 1


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_build_for_the_data(name, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"model@student={name}"])
    model = build_model(cfg.student)
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("name", options("knowledge"))
def test_knowledge_configs_instantiate(name, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"knowledge={name}"])
    terms = build_knowledge(cfg)
    assert terms and all(isinstance(t, Knowledge) for t in terms.values())


def test_knowledge_list_composes_into_named_terms(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "knowledge=[kd,response]", "knowledge.kd.temperature=2"])
    terms = build_knowledge(cfg)
    assert list(terms) == ["kd"] and isinstance(terms["kd"], KD) and terms["kd"].temperature == 2


@pytest.mark.parametrize("mode,cls", [("offline", Offline), ("baseline", Baseline)])
def test_mode_configs_name_schemes(mode, cls, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"mode={mode}"])
    assert instantiate(cfg.mode, _partial_=True).func is cls


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", [*options("scheduler"), "null"])
def test_optimizer_and_scheduler_configs_instantiate(optimizer, scheduler, tmp_path):
    chosen = [f"scheduler={scheduler}"] if scheduler != "null" else []  # null: the default, none
    cfg = compose_config([*fast_overrides(tmp_path), f"optimizer={optimizer}", *chosen])
    built = optimisation(cfg)
    opt = built["optimizer"]([nn.Parameter(nn.init.zeros_(nn.Linear(2, 2).weight))])
    assert opt.__class__.__name__.lower() == optimizer
    if scheduler != "null":
        assert built["scheduler"](opt).optimizer is opt
    else:
        assert built["scheduler"] is None


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_compose(trainer, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if cfg.trainer.accelerator != "gpu":  # GPU configs build where a GPU is (tests/test_scale_out.py)
        assert isinstance(build_trainer(cfg, logger=False), L.Trainer)


def test_trainer_arguments_come_from_trainer_keys(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "trainer.max_epochs=3", "trainer.limit_train_batches=5"])
    trainer = build_trainer(cfg, logger=False)
    assert trainer.max_epochs == 3 and trainer.limit_train_batches == 5


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs_instantiate(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config([*fast_overrides(tmp_path), f"logger={logger}"])
    loggers = build_loggers(cfg)
    assert len(loggers) == (0 if logger == "none" else 1)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callback_configs_instantiate(callbacks, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"callbacks={callbacks}"])
    assert all(isinstance(c, L.Callback) for c in build_callbacks(cfg))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_configs_compose(experiment, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), f"experiment={experiment}"])
    OmegaConf.resolve(cfg.trainer)


def test_trainer_config_lists_every_trainer_argument():
    import inspect

    listed = set(compose_config([]).trainer) - {"_target_"}
    wanted = set(inspect.signature(L.Trainer.__init__).parameters) - {
        "self",
        "logger",
        "callbacks",
        "model_registry",
    }
    assert wanted <= listed, f"add to conf/trainer/default.yaml: {sorted(wanted - listed)}"
