"""Build kdlab's objects from a composed Hydra config: one place, used by every caller.

`run.py` builds the distillation run from here, and the teacher store builds the
teacher's own training run from the same functions, so both are configured identically.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import hydra.utils
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.errors import KdlabError
from kdlab.optim import DOT
from kdlab.tasks import task_of


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a KdlabError raised inside reaches the user unwrapped."""
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, KdlabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# kdlab's model builders take `config_key`, the node's name, so their errors name the keys to set.
MODEL_BUILDERS = (
    "kdlab.models.create_model",
    "kdlab.models.registry.create_model",
    "kdlab.models.hf_lm.create_causal_lm",
)


def build_model(node: DictConfig, **overrides: Any) -> nn.Module:
    """A model from a `model/` config node (`teacher` or `student`), its errors naming that node."""
    key = node._key() if isinstance(node, DictConfig) else None
    if key is not None and "config_key" not in overrides and _builds_kdlab_model(node):
        overrides["config_key"] = str(key)
    return instantiate(node, **overrides)


def _builds_kdlab_model(node: DictConfig) -> bool:
    return node.get("_target_") in MODEL_BUILDERS


def build_knowledge(cfg: DictConfig) -> dict[str, nn.Module]:
    """The named knowledge losses of `knowledge=` (one config, or a list of them).

    Each is given the name it is configured under, so its messages name the key the user types.
    """
    knowledge = cfg.get("knowledge") or {}
    return {name: instantiate(node, name=name) for name, node in knowledge.items()}


def optimisation(
    cfg: DictConfig, optimizer_overrides: Mapping | None = None, dot: bool = True
) -> dict[str, Any]:
    """The partial optimizer and scheduler, as scheme keyword arguments.

    `optimizer_overrides` are merged over `optimizer.*` first (the teacher's own settings). With
    `dot` and `dot.enabled`, the SGD optimizer becomes DOT (kdlab.optim) with the same settings.
    Each optimizer is tried here on a dummy parameter: the scheme builds the real one only when the
    fit starts, so a setting its constructor refuses (`optimizer.lr=-1`) would otherwise surface as
    a traceback after a teacher was trained. It is a KdlabError naming the key instead.
    """
    # What to do about the values torch's optimizers check (the key is found in their message).
    hints = {
        "lr": "use a positive learning rate (e.g. {key}=1e-3)",
        "momentum": "use a momentum >= 0 (e.g. {key}=0.9)",
        "weight_decay": "use a weight decay >= 0 (e.g. {key}=5e-4)",
        "betas": "use betas in [0, 1) (e.g. {key}=[0.9,0.999])",
        "eps": "use an epsilon >= 0 (e.g. {key}=1e-8)",
        "nesterov": "Nesterov momentum needs a momentum > 0 and dampening 0 (or set {key}=false)",
    }
    aliases = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "nesterov": "nesterov"}

    def tried(node: DictConfig, prefix: str, own: Any = ()) -> Any:
        partial = instantiate(node)
        try:
            # A zero parameter: building an nn.Linear would draw from the RNG the run is seeded with.
            partial([nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as error:
            message = str(error)
            words = {word.strip("'\":,.()") for word in message.split()}
            names = [name for word, name in aliases.items() if word in message.lower()]
            names += [str(n) for n in node if str(n) in words]
            if not names:
                return partial  # not clearly a bad setting: the real construction reports it
            key = f"{prefix if names[0] in own else 'optimizer'}.{names[0]}"
            if "unexpected keyword" in message:
                what = f"it takes no `{names[0]}`: remove it (~{key}) or check the spelling"
            else:
                what = hints.get(names[0], "set a value it accepts").format(key=key)
            value = OmegaConf.select(node, names[0], default=None)
            value = str(value).lower() if isinstance(value, bool) else value  # as typed: true, not True
            raise KdlabError(
                f"{key}={value} is refused by {node.get('_target_')} ({message}): {what}."
            ) from None
        except Exception:  # e.g. an optimizer that needs a process group: it is built later
            pass
        return partial

    scheduler = cfg.get("scheduler")
    optimizer = tried(cfg.optimizer, "optimizer")  # the run's own first: its key is the one to name
    if optimizer_overrides:
        merged = OmegaConf.merge(cfg.optimizer, optimizer_overrides)
        optimizer = tried(merged, "teacher_training.optimizer", set(optimizer_overrides))
    if dot and (cfg.get("dot") or {}).get("enabled"):
        node = OmegaConf.merge(cfg.optimizer, optimizer_overrides) if optimizer_overrides else cfg.optimizer
        optimizer = distillation_oriented(cfg, node)
    return {
        "optimizer": optimizer,
        "scheduler": instantiate(scheduler) if scheduler else None,
    }


def distillation_oriented(cfg: DictConfig, node: DictConfig | None = None) -> functools.partial:
    """DOT (kdlab.optim) with the SGD settings of `node` (`optimizer.*` by default) and `dot.delta`."""
    node = cfg.optimizer if node is None else node
    if node.get("_target_") not in ("torch.optim.SGD", "torch.optim.sgd.SGD") or node.get("nesterov"):
        raise KdlabError(
            f"dot.enabled=true gives SGD's momentum a task and a distillation part, but optimizer is "
            f"{node.get('_target_')}{' with nesterov' if node.get('nesterov') else ''}. Use optimizer=sgd "
            "(without optimizer.nesterov) with DOT, or set dot.enabled=false."
        )
    settings = {key: node[key] for key in ("lr", "momentum", "weight_decay", "dampening") if key in node}
    try:
        DOT([nn.Parameter(torch.zeros(1))], delta=cfg.dot.delta, **settings)
    except (ValueError, TypeError) as error:
        raise KdlabError(
            f"dot.delta={cfg.dot.delta} with optimizer.momentum={node.get('momentum')}: {error}. DOT's two "
            "momenta are momentum - delta and momentum + delta; the paper uses momentum 0.9, dot.delta=0.075."
        ) from None
    return functools.partial(DOT, delta=cfg.dot.delta, **settings)


def scheme_class(cfg: DictConfig) -> type[L.LightningModule]:
    """The scheme class `mode=` builds."""
    return hydra.utils.get_class(cfg.mode._target_)


def build_scheme(
    cfg: DictConfig,
    datamodule: L.LightningDataModule,
    knowledge: Mapping[str, nn.Module] | None,
    sources: Mapping[str, Any] | None = None,
    *,
    mode: DictConfig | None = None,
    student: nn.Module | None = None,
    optimizer_overrides: Mapping | None = None,
    dot: bool = True,
    **kwargs: Any,
) -> L.LightningModule:
    """The `mode=` LightningModule (or `mode`, another scheme config) around a fresh student.

    `sources` are what the scheme learns from (`Scheme.sources_for(...).modules`, e.g. teacher=);
    `student` replaces the configured student (e.g. a teacher being trained); `dot=False` keeps
    plain SGD where `dot.enabled` (a model trained without distillation); `kwargs` go to the
    scheme's constructor (e.g. model_name=).
    """
    return instantiate(
        mode if mode is not None else cfg.mode,
        student=student if student is not None else build_model(cfg.student),
        knowledge=knowledge,
        num_classes=datamodule.num_classes,
        input_shape=tuple(datamodule.input_shape),
        task=task_of(datamodule),
        num_samples=datamodule.train_split_size,
        **optimisation(cfg, optimizer_overrides, dot),
        **dict(sources or {}),
        **kwargs,
        _recursive_=False,
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = cfg.get("callbacks") or {}
    return [instantiate(node) for node in callbacks.values() if node]


def build_trainer(cfg: DictConfig, trainer_overrides: Mapping | None = None, **kwargs: Any) -> L.Trainer:
    """A Lightning Trainer from `trainer.*`, with overrides merged in first."""
    node = cfg.trainer
    if trainer_overrides:
        node = OmegaConf.merge(node, trainer_overrides)
    return instantiate(node, **kwargs)
