"""Experiment loggers from `logger=` (csv, tensorboard, wandb, or a list of them).

W&B specifics live here: each job of a Hydra multirun is its own W&B run, grouped by the
sweep and tagged with its mode and knowledge, and `finish_loggers` closes the run in a
`finally:` so that the next job of a multirun never logs into this one.

`logger=csv` builds kdlab's `CSVLogger`, Lightning's with one change: the columns of an existing
metrics.csv are read from the file, not remembered in memory, so that the test metrics of a
`ddp_spawn` run are added to the file its fit wrote (see `CSVLogger`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, open_dict

from kdlab.build import instantiate, scheme_class


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger, whose writer takes metrics.csv's columns from the file itself.

    Lightning's writer keeps the columns it has written in memory (`metrics_keys`) and, when a
    row brings new ones, rewrites the file with the known columns plus the new ones. Under
    `ddp_spawn`, `fit` and `test` each run in fresh worker processes, and each gets a copy of the
    main process's logger, whose writer never saw a column: the fit workers' copy learns them,
    but it dies with the workers. The test worker then "rewrites" the file with the test columns
    alone, fails on the fit rows (`ValueError: dict contains fields not in fieldnames`) and leaves
    metrics.csv holding the header only. Reading the header from the file before each write
    makes the file the one record of its columns, whichever process writes next. It costs one
    line read per flush (every `flush_logs_every_n_steps` steps, and at the end of each stage).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = FileColumnsWriter(log_dir=self.log_dir)
        return self._experiment


class FileColumnsWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, taking the columns of an existing metrics.csv from its header."""

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])
        super().save()


def sweep_name() -> str | None:
    """The multirun's sweep directory name, or None outside a multirun."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def run_tags(cfg: DictConfig) -> list[str]:
    """`mode:<scheme name>` (e.g. byot, not the family `self`) and `knowledge:<name>` per term."""
    return [f"mode:{scheme_class(cfg).name}", *(f"knowledge:{name}" for name in (cfg.get("knowledge") or {}))]


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
