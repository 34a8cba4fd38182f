"""A store of trained teachers, keyed by everything that determines them.

Offline distillation needs a trained teacher. Given `teacher.checkpoint=PATH` kdlab loads
it; otherwise it trains one with the baseline scheme and keeps it here, keyed by a hash of
the teacher's model config, the data config, the optimizer and scheduler, the Trainer
arguments that change the result, and the seed. A second run, and every job of a sweep,
then reuses it. A file lock makes concurrent jobs wait for one training instead of
repeating it, and files are written to a temporary name and renamed, so a run killed
while storing a teacher leaves nothing that a later run would mistake for a teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.build import build_model, build_trainer, optimisation
from kdlab.schemes import Baseline

log = logging.getLogger(__name__)

WEIGHTS = "teacher.pt"
# Trainer arguments that change the trained weights; logging, devices and the like do not.
TRAINING_ARGS = (
    "max_epochs",
    "max_steps",
    "min_epochs",
    "limit_train_batches",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
)
# Data arguments that say where the data is or how fast it loads, not what it is.
DATA_LOCATION_ARGS = ("root", "num_workers", "pin_memory", "download", "download_dir")


@dataclass
class TeacherRecord:
    """Which teacher a run used: loaded from a checkpoint, found in the store, or trained."""

    source: str
    path: str
    key: str | None = None


def teacher_spec(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the teacher a run would train, as plain data."""
    model = OmegaConf.to_container(cfg.teacher, resolve=True)
    model.pop("checkpoint", None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for name in DATA_LOCATION_ARGS:
        data.pop(name, None)
    trainer = OmegaConf.to_container(OmegaConf.merge(cfg.trainer, cfg.teacher_training.trainer), resolve=True)
    return {
        "model": model,
        "data": data,
        "optimizer": OmegaConf.to_container(
            OmegaConf.merge(cfg.optimizer, cfg.teacher_training.optimizer), resolve=True
        ),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "trainer": {name: trainer.get(name) for name in TRAINING_ARGS},
        "seed": cfg.seed,
    }


def spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_atomic(write: Callable[[Path], None], path: Path) -> None:
    """Write through a temporary file and rename it, so `path` is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TeacherStore:
    """Teachers on disk under `root`, one directory per spec: `<model>-<key>/teacher.pt`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def entry(self, spec: dict[str, Any]) -> Path:
        return self.root / f"{spec['model'].get('name', 'model').replace('/', '_')}-{spec_key(spec)}"

    def fetch_or_train(
        self, spec: dict[str, Any], train: Callable[[Path], tuple[dict, dict]]
    ) -> TeacherRecord:
        """The stored teacher for `spec`, training and storing it first if there is none."""
        entry = self.entry(spec)
        entry.mkdir(parents=True, exist_ok=True)
        key = spec_key(spec)
        with FileLock(f"{entry}.lock"):
            weights = entry / WEIGHTS
            if weights.exists():
                return TeacherRecord("store", str(weights), key)
            for leftover in entry.glob(".*.tmp"):  # from a run killed while storing
                leftover.unlink()
            state_dict, metrics = train(entry)
            meta = {"spec": spec, "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            save_atomic(lambda p: p.write_text(json.dumps(meta, indent=2)), entry / "meta.json")
            # The weights go last: their presence is what marks the entry complete.
            save_atomic(lambda p: torch.save({"state_dict": state_dict, **meta}, p), weights)
            return TeacherRecord("trained", str(weights), key)


def train_teacher(cfg: DictConfig, datamodule: L.LightningDataModule, entry: Path) -> tuple[dict, dict]:
    """Train the configured teacher with the baseline scheme; return its weights and metrics."""
    log.info("No stored teacher for this configuration: training %s first (%s)", cfg.teacher.name, entry)
    L.seed_everything(cfg.seed, workers=True)
    teacher = build_model(cfg.teacher, checkpoint=None)
    scheme = Baseline(
        student=teacher,
        num_classes=datamodule.num_classes,
        input_shape=tuple(datamodule.input_shape),
        model_name="teacher",
        **optimisation(cfg, cfg.teacher_training.optimizer),
    )
    trainer = build_trainer(
        cfg,
        cfg.teacher_training.trainer,
        logger=CSVLogger(entry, name="train_log", version=""),
        callbacks=[],
        enable_checkpointing=False,
    )
    trainer.fit(scheme, datamodule=datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return teacher.state_dict(), metrics


def obtain_teacher(cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[nn.Module, TeacherRecord]:
    """The frozen teacher for offline distillation: from `teacher.checkpoint`, the store, or trained."""
    if cfg.teacher.get("checkpoint"):
        record = TeacherRecord("checkpoint", str(Path(cfg.teacher.checkpoint).expanduser()))
    else:
        store = TeacherStore(cfg.teacher_training.store)
        record = store.fetch_or_train(teacher_spec(cfg), lambda entry: train_teacher(cfg, datamodule, entry))
    log.info("Teacher %s: %s from %s", cfg.teacher.name, record.source, record.path)
    return build_model(cfg.teacher, checkpoint=record.path), record


def record_dict(record: TeacherRecord | None) -> dict[str, Any] | None:
    return asdict(record) if record else None
