"""Build kdlab's objects from a composed Hydra config: one place, used by every caller.

`run.py` builds the distillation run from here, and the teacher store builds the
teacher's own training run from the same functions, so both are configured identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra.utils
import lightning as L
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.errors import KdlabError
from kdlab.schemes import Scheme


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


def build_model(node: DictConfig, **overrides: Any) -> nn.Module:
    """A model from a `model/` config node (`teacher` or `student`)."""
    return instantiate(node, **overrides)


def build_knowledge(cfg: DictConfig) -> dict[str, nn.Module]:
    """The named knowledge losses of `knowledge=` (one config, or a list of them)."""
    knowledge = cfg.get("knowledge") or {}
    return {name: instantiate(node) for name, node in knowledge.items()}


def optimisation(cfg: DictConfig, optimizer_overrides: Mapping | None = None) -> dict[str, Any]:
    """The partial optimizer and scheduler, as scheme keyword arguments.

    `optimizer_overrides` are merged over `optimizer.*` first (the teacher's own settings).
    """
    scheduler = cfg.get("scheduler")
    optimizer = OmegaConf.merge(cfg.optimizer, optimizer_overrides) if optimizer_overrides else cfg.optimizer
    return {
        "optimizer": instantiate(optimizer),
        "scheduler": instantiate(scheduler) if scheduler else None,
    }


def scheme_class(cfg: DictConfig) -> type[Scheme]:
    """The scheme `mode=` builds (for mode=self, the class of `mode.method`)."""
    cls = hydra.utils.get_class(cfg.mode._target_)
    return cls.scheme_class(cfg.mode.method) if hasattr(cls, "scheme_class") else cls


def build_scheme(
    cfg: DictConfig, datamodule: L.LightningDataModule, knowledge: dict[str, nn.Module], **sources: nn.Module
) -> Scheme:
    """The `mode=` LightningModule around a fresh student, with `sources` (e.g. teacher=)."""
    if cfg.mode.get("extra_peers"):  # more peers for online mode: the student's config, other names
        sources["extra_peers"] = [build_model(cfg.student, name=name) for name in cfg.mode.extra_peers]
    return instantiate(
        cfg.mode,
        student=build_model(cfg.student),
        knowledge=knowledge,
        num_classes=datamodule.num_classes,
        input_shape=tuple(datamodule.input_shape),
        num_samples=datamodule.train_split_size if knowledge else None,
        **optimisation(cfg),
        **sources,
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
