"""A store of trained teachers, keyed by everything that determines them.

Offline distillation needs a trained teacher. Given `teacher.checkpoint=PATH` kdlab loads
it; otherwise it trains one with the baseline scheme and keeps it here, keyed by a hash of
the teacher's model config, the data config, the optimizer and scheduler, the Trainer
arguments that change the result, and the teacher's own seed (`teacher_training.seed`, not the
run's: runs that differ only in `seed` share a teacher). A second run, and every job of a sweep,
then reuses it. A file lock makes concurrent jobs wait for one training instead of
repeating it, and files are written to a temporary name and renamed, so a run killed
while storing a teacher leaves nothing that a later run would mistake for a teacher.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.build import build_knowledge, build_model, build_scheme, build_trainer
from kdlab.errors import KdlabError
from kdlab.knowledge import Knowledge
from kdlab.loggers import CSVLogger
from kdlab.resume import EpochSeed
from kdlab.store import build_once, content_key, save_atomic

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
# The schemes a teacher is trained with: alone, or (a Born-Again generation) from its predecessor.
BASELINE, OFFLINE = "kdlab.schemes.Baseline", "kdlab.schemes.Offline"


@dataclass
class TeacherRecord:
    """Which teacher a run used: loaded from a checkpoint, found in the store, or trained."""

    source: str
    path: str
    key: str | None = None


def teacher_spec(cfg: DictConfig, datamodule: Any = None) -> dict[str, Any]:
    """Everything that determines the teacher a run would train, as plain data. For a text corpus, whose
    `root` is the corpus itself rather than where a known dataset lies, the digest of its text
    (`corpus_key`) stands in for it."""
    model = OmegaConf.to_container(cfg.teacher, resolve=True)
    model.pop("checkpoint", None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for name in DATA_LOCATION_ARGS:
        data.pop(name, None)
    if hasattr(datamodule, "corpus_key"):
        data["corpus"] = datamodule.corpus_key()
    trainer = OmegaConf.to_container(OmegaConf.merge(cfg.trainer, cfg.teacher_training.trainer), resolve=True)
    return {
        "model": model,
        "data": data,
        "optimizer": OmegaConf.to_container(
            OmegaConf.merge(cfg.optimizer, cfg.teacher_training.optimizer), resolve=True
        ),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "trainer": {name: trainer.get(name) for name in TRAINING_ARGS},
        "seed": cfg.teacher_training.seed,
    }


class TeacherStore:
    """Teachers on disk under `root`, one directory per spec: `<model>-<key>/teacher.pt`.

    Schemes ask it for what they learn from (`Scheme.sources_for`): the frozen teacher of offline
    distillation (`frozen_teacher`) and Born-Again's chain of generations (`generations`).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def entry(self, spec: dict[str, Any]) -> Path:
        return self.root / f"{spec['model'].get('name', 'model').replace('/', '_')}-{content_key(spec)}"

    def fetch_or_train(
        self, spec: dict[str, Any], train: Callable[[Path], tuple[dict, dict]]
    ) -> TeacherRecord:
        """The stored teacher for `spec`, training and storing it first if there is none.

        Weights that are not all finite are refused: a diverged teacher is never stored, so a
        later run cannot reuse it.
        """
        entry = self.entry(spec)

        def train_and_store(entry: Path) -> None:
            state_dict, metrics = train(entry)
            refuse_nonfinite(state_dict, spec["model"].get("name", "teacher"))
            meta = {"spec": spec, "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            save_atomic(lambda p: p.write_text(json.dumps(meta, indent=2)), entry / "meta.json")
            # The weights go last: their presence is what marks the entry complete.
            save_atomic(lambda p: torch.save({"state_dict": state_dict, **meta}, p), entry / WEIGHTS)

        built = build_once(entry, WEIGHTS, train_and_store, f"training the teacher {entry.name}")
        return TeacherRecord("trained" if built else "store", str(entry / WEIGHTS), content_key(spec))

    def frozen_teacher(
        self, cfg: DictConfig, datamodule: L.LightningDataModule
    ) -> tuple[nn.Module, TeacherRecord]:
        """The frozen teacher of offline distillation: `teacher.checkpoint`, else the stored one
        for this configuration, trained first if there is none."""
        if cfg.teacher.get("checkpoint"):
            record = TeacherRecord("checkpoint", str(Path(cfg.teacher.checkpoint).expanduser()))
        else:
            record = self.fetch_or_train(
                teacher_spec(cfg, datamodule), lambda entry: train_teacher(cfg, datamodule, entry)
            )
        log.info("Teacher %s: %s from %s", cfg.teacher.name, record.source, record.path)
        return build_model(cfg.teacher, checkpoint=record.path), record

    def generations(
        self, cfg: DictConfig, datamodule: L.LightningDataModule, count: int
    ) -> tuple[nn.Module, dict[str, nn.Module], TeacherRecord]:
        """Born-Again: generations 0..count-1 of the student's architecture, each from the store.

        Generation 0 is the architecture trained alone; generation k distils from k-1 with the
        configured knowledge. Each is stored under a key that includes its teacher's key, so a run
        interrupted mid-chain resumes at the first generation not yet stored. Returns generation
        count-1 (the teacher of the run's student, generation `count`), the earlier ones by name
        (gen0, gen1, ...), and the record of the last one.
        """
        if count < 1:
            raise KdlabError(
                f"mode.generations={count}: Born-Again needs at least one earlier generation to distil from. "
                "Set mode.generations=K (K >= 1; the run trains generation K from generation K-1)."
            )
        chain_cfg = cfg.copy()
        with open_dict(chain_cfg):
            chain_cfg.teacher = cfg.student  # every generation has the student's architecture
            # and the student's budget and optimizer (Sec. 3), not a pretrained teacher's
            # (teacher_training.*: the default job's teacher trains longer than its student).
            chain_cfg.teacher_training.trainer = {}
            chain_cfg.teacher_training.optimizer = {}
        base = teacher_spec(chain_cfg, datamodule)
        generations: dict[str, nn.Module] = {}
        record: TeacherRecord | None = None
        for k in range(count):
            name, previous = f"gen{k}", generations.get(f"gen{k - 1}")
            spec = base
            if k > 0:
                spec = {
                    **base,
                    "born_again": {
                        "generation": k,
                        "teacher": record.key,
                        "knowledge": OmegaConf.to_container(cfg.knowledge, resolve=True),
                        "task_weight": cfg.mode.get("task_weight"),
                    },
                }
            record = self.fetch_or_train(
                spec,
                lambda entry, previous=previous, k=k, name=name: train_teacher(
                    chain_cfg, datamodule, entry, source=previous, name=name, seed_offset=k
                ),
            )
            log.info("Born-Again %s: %s from %s", name, record.source, record.path)
            generations[name] = (
                build_model(chain_cfg.teacher, checkpoint=record.path).eval().requires_grad_(False)
            )
        teacher = generations.pop(f"gen{count - 1}")
        return teacher, generations, record


def selection_metric(cfg: DictConfig) -> tuple[str, str]:
    """What a run's best epoch is chosen by, as (metric, mode): the metric of callbacks.model_checkpoint's
    monitor (val/student/top1, max; val/student/perplexity, min with task=lm), else top-1."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    monitor = node.get("monitor") or "val/student/top1"
    return str(monitor).rsplit("/", 1)[-1], str(node.get("mode", "max"))


def refuse_nonfinite(state_dict: dict[str, torch.Tensor], model: str) -> None:
    """Raise a KdlabError if any floating-point tensor of `state_dict` holds NaN or infinity."""
    bad = [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise KdlabError(
            f"The trained teacher {model} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}), so it "
            "is not stored: its training diverged. Lower the teacher's learning rate "
            "(teacher_training.optimizer.lr, which follows optimizer.lr) or check the data, then rerun."
        )


def train_teacher(
    cfg: DictConfig,
    datamodule: L.LightningDataModule,
    entry: Path,
    source: nn.Module | None = None,
    name: str = "teacher",
    seed_offset: int = 0,
    best_on_validation: bool = False,
) -> tuple[dict, dict]:
    """Train the configured teacher model; return its weights and metrics.

    Alone (the baseline scheme), or, given a frozen `source`, distilled from it with the
    configured knowledge (a Born-Again generation). `name` labels its metrics. The weights are the
    last epoch's, or with `best_on_validation` the epoch's with the best validation top-1 (or what the
    run selects by: `selection_metric`), which is
    what a run reports (its test uses the checkpoint callback's best): a stored baseline is compared
    with a run's student on the same footing.
    """
    log.info("No stored %s for this configuration: training %s first (%s)", name, cfg.teacher.name, entry)
    seed = cfg.teacher_training.seed + seed_offset
    L.seed_everything(seed, workers=True)
    model = build_model(cfg.teacher, checkpoint=None)
    # Through the one scheme builder: the baseline scheme alone, or offline KD from `source`.
    if source is None:
        mode, knowledge, sources = OmegaConf.create({"_target_": BASELINE}), None, {}
    else:
        mode = OmegaConf.create({"_target_": OFFLINE, "task_weight": cfg.mode.get("task_weight")})
        knowledge, sources = build_knowledge(cfg), {"teacher": source}
        refuse_for_generations(knowledge)
    scheme = build_scheme(
        cfg,
        datamodule,
        knowledge,
        sources,
        mode=mode,
        student=model,
        optimizer_overrides=cfg.teacher_training.optimizer,
        dot=source is not None,  # DOT splits a distillation gradient; a teacher on its own has none
        model_name=name,
    )
    # Seeded per epoch as a run is: a stored baseline is then the mode=baseline run of its seed.
    callbacks: list[L.Callback] = [EpochSeed(seed)]
    if best_on_validation:
        metric, mode = selection_metric(cfg)
        best = ModelCheckpoint(
            dirpath=entry / "best", monitor=f"val/{name}/{metric}", mode=mode, save_weights_only=True
        )
        callbacks.append(best)
    trainer = build_trainer(
        cfg,
        OmegaConf.merge(SINGLE_PROCESS, cfg.teacher_training.trainer),
        logger=CSVLogger(entry, name="train_log", version=""),
        callbacks=callbacks,
        enable_checkpointing=best_on_validation,
    )
    trainer.fit(scheme, datamodule=datamodule)
    if best_on_validation and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        scheme.load_state_dict(state)
        shutil.rmtree(entry / "best")
    # The run reuses this datamodule; under ddp_spawn its Trainer pickles it for the workers, and
    # it must not carry this Trainer along (with the teacher's training state, graph included).
    datamodule.trainer = None
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return model.state_dict(), metrics


def refuse_for_generations(knowledge: dict[str, nn.Module]) -> None:
    """A generation trained in the store is a plain model fit: no stages, no extra views, and its
    own classifier as the deployed model. Losses that need more are refused before training."""
    for name, term in knowledge.items():
        needs = []
        if term.stages():
            needs.append("a stage before the main fit")
        if term.views:
            needs.append(f"extra views of each sample ({', '.join(term.views)})")
        if type(term).deployed_student is not Knowledge.deployed_student:
            needs.append("a deployed student other than the model itself")
        if needs:
            raise KdlabError(
                "mode=born_again trains its generations as plain models in the teacher store, but "
                f"knowledge.{name} needs {' and '.join(needs)}, which a stored generation cannot have. Use "
                "it with mode=offline (e.g. teacher.checkpoint=<a generation's teacher.pt>), or pick "
                "another knowledge for mode=born_again (e.g. knowledge=kd)."
            )


def record_dict(record: TeacherRecord | None) -> dict[str, Any] | None:
    return asdict(record) if record else None
