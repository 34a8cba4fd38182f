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
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.build import build_knowledge, build_model, build_trainer, optimisation
from kdlab.errors import KdlabError
from kdlab.loggers import CSVLogger
from kdlab.schemes import Baseline, Offline

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
# A teacher is trained by one process on one device, so its weights do not depend on the run's
# device count (which is not in the key), and under DDP, where every rank asks the store, one
# rank trains while the others wait on the lock: a DDP teacher would wait for ranks that are
# themselves waiting on that lock. `teacher_training.trainer.*` still overrides these.
SINGLE_PROCESS = {"strategy": "auto", "devices": 1, "num_nodes": 1, "sync_batchnorm": False}
# Data arguments that say where the data is or how fast it loads, not what it is.
DATA_LOCATION_ARGS = ("root", "num_workers", "pin_memory", "download", "download_dir", "precompute_inputs")


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


def train_teacher(
    cfg: DictConfig,
    datamodule: L.LightningDataModule,
    entry: Path,
    source: nn.Module | None = None,
    name: str = "teacher",
    seed_offset: int = 0,
) -> tuple[dict, dict]:
    """Train the configured teacher model; return its weights and metrics.

    Alone (the baseline scheme), or, given a frozen `source`, distilled from it with the
    configured knowledge (a Born-Again generation). `name` labels its metrics.
    """
    log.info("No stored %s for this configuration: training %s first (%s)", name, cfg.teacher.name, entry)
    L.seed_everything(cfg.seed + seed_offset, workers=True)
    model = build_model(cfg.teacher, checkpoint=None)
    common = {
        "student": model,
        "num_classes": datamodule.num_classes,
        "input_shape": tuple(datamodule.input_shape),
        "model_name": name,
        **optimisation(cfg, cfg.teacher_training.optimizer),
    }
    if source is None:
        scheme = Baseline(**common)
    else:
        scheme = Offline(
            teacher=source,
            knowledge=build_knowledge(cfg),
            num_samples=datamodule.train_split_size,
            task_weight=cfg.mode.get("task_weight"),
            **common,
        )
    trainer = build_trainer(
        cfg,
        OmegaConf.merge(SINGLE_PROCESS, cfg.teacher_training.trainer),
        logger=CSVLogger(entry, name="train_log", version=""),
        callbacks=[],
        enable_checkpointing=False,
    )
    trainer.fit(scheme, datamodule=datamodule)
    # The run reuses this datamodule; under ddp_spawn its Trainer pickles it for the workers, and
    # it must not carry this Trainer along (with the teacher's training state, graph included).
    datamodule.trainer = None
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return model.state_dict(), metrics


def obtain_teacher(cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[nn.Module, TeacherRecord]:
    """The frozen teacher for offline distillation: from `teacher.checkpoint`, the store, or trained."""
    if cfg.teacher.get("checkpoint"):
        record = TeacherRecord("checkpoint", str(Path(cfg.teacher.checkpoint).expanduser()))
    else:
        store = TeacherStore(cfg.teacher_training.store)
        record = store.fetch_or_train(teacher_spec(cfg), lambda entry: train_teacher(cfg, datamodule, entry))
    log.info("Teacher %s: %s from %s", cfg.teacher.name, record.source, record.path)
    return build_model(cfg.teacher, checkpoint=record.path), record


def obtain_generations(
    cfg: DictConfig, datamodule: L.LightningDataModule
) -> tuple[nn.Module, dict[str, nn.Module], list[TeacherRecord]]:
    """Born-Again: generations 0..K-1 of the student's architecture, each from the store.

    Generation 0 is the architecture trained alone; generation k distils from k-1 with the
    configured knowledge. Each is stored under a key that includes its teacher's key, so a run
    interrupted mid-chain resumes at the first generation not yet stored. Returns generation
    K-1 (the teacher of the run's student, generation K), the earlier ones, and their records.
    """
    count = int(cfg.mode.get("generations", 0))
    if count < 1:
        raise KdlabError(
            f"mode.generations={count}: Born-Again needs at least one earlier generation to distil "
            "from. Set mode.generations=K (K >= 1; the run trains generation K from generation K-1)."
        )
    chain_cfg = cfg.copy()
    with open_dict(chain_cfg):
        chain_cfg.teacher = cfg.student  # every generation has the student's architecture
    store, base = TeacherStore(cfg.teacher_training.store), teacher_spec(chain_cfg)
    generations: dict[str, nn.Module] = {}
    records: list[TeacherRecord] = []
    for k in range(count):
        name, previous = f"gen{k}", generations.get(f"gen{k - 1}")
        spec = base
        if k > 0:
            spec = {
                **base,
                "born_again": {
                    "generation": k,
                    "teacher": records[-1].key,
                    "knowledge": OmegaConf.to_container(cfg.knowledge, resolve=True),
                    "task_weight": cfg.mode.get("task_weight"),
                },
            }
        record = store.fetch_or_train(
            spec,
            lambda entry, previous=previous, k=k, name=name: train_teacher(
                chain_cfg, datamodule, entry, source=previous, name=name, seed_offset=k
            ),
        )
        log.info("Born-Again %s: %s from %s", name, record.source, record.path)
        generations[name] = (
            build_model(chain_cfg.teacher, checkpoint=record.path).eval().requires_grad_(False)
        )
        records.append(record)
    teacher = generations.pop(f"gen{count - 1}")
    return teacher, generations, records


def record_dict(record: TeacherRecord | None) -> dict[str, Any] | None:
    return asdict(record) if record else None
