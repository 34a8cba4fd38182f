"""Experiment loggers from `logger=` (csv, tensorboard, wandb, or a list of them).

W&B specifics live here: each job of a Hydra multirun is its own W&B run, grouped by the
sweep and tagged with its mode and knowledge, and `finish_loggers` closes the run in a
`finally:` so that the next job of a multirun never logs into this one.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, open_dict

from kdlab.build import instantiate


def sweep_name() -> str | None:
    """The multirun's sweep directory name, or None outside a multirun."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def run_tags(cfg: DictConfig) -> list[str]:
    mode = cfg.mode._target_.rsplit(".", 1)[-1].lower()
    return [f"mode:{mode}", *(f"knowledge:{name}" for name in (cfg.get("knowledge") or {}))]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node:
            continue
        if node._target_.endswith("WandbLogger"):
            node = node.copy()
            with open_dict(node):
                node.group = node.get("group") or sweep_name()
                node.tags = [*(node.get("tags") or []), *run_tags(cfg)]
        loggers.append(instantiate(node))
    return loggers


def finish_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """Close W&B runs (Lightning leaves them open), marking a failed job as failed."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)
