"""Resuming an interrupted run, and stopping cleanly when a scheduler preempts one.

How a run is resumed:
- `ckpt_path=last hydra.run.dir=<run dir>` resumes the run in `<run dir>`, in place. It starts from
  the newest of `checkpoints/last.ckpt` (written at every epoch end), `checkpoints/preempted.ckpt`
  (written on SIGTERM) and Lightning's SLURM checkpoints `hpc_ckpt_*.ckpt`. The run keeps its
  logs: the CSV file grows, and a W&B logger continues the same W&B run. Pass the original run's
  overrides again (they are in `<run dir>/.hydra/overrides.yaml`); a preempted run prints the
  whole command.
- `ckpt_path=<file>` starts a new run, in a new directory, from that checkpoint's state, so a run
  never overwrites another run's outputs. Setting `hydra.run.dir` to the checkpoint's own run
  directory resumes that run in place instead.
- On SLURM with `ckpt_path=null`, a requeued job whose run directory already holds a checkpoint
  resumes from it, just as Lightning resumes from its own SIGUSR1 checkpoints. The job script must
  pin the run directory, e.g. `hydra.run.dir=outputs/slurm-$SLURM_JOB_ID`.

Lightning restores the model, optimizer, scheduler, the loss adapters and their buffers (e.g.
CRD's memory banks, which are part of the scheme) and the loop state, epoch included. `RunRecord`
adds what Lightning does not know about to every checkpoint: the teacher (its record and a digest
of its weights) and the W&B run id. A resume whose configured teacher has other weights is refused.

Resuming from an end-of-epoch checkpoint gives results bit-identical to an uninterrupted run on the
CPU. Lightning does not restore the global RNGs, so training randomness is made a function of
(seed, epoch) instead of the RNGs' history: `EpochSeed` seeds the RNGs as each training epoch
starts (dropout, CRD's negatives, in-process augmentation), and the train sampler shuffles from
(seed, epoch) (`kdlab.data.base.EpochShuffle`). A resume from `preempted.ckpt`, saved mid-epoch,
is not bit-identical: Lightning draws the interrupted epoch's remaining batches from the start of
its order again (its loader is not resumable), so that epoch repeats its first batches instead of
its last ones, and Lightning warns about it. With `data.num_workers > 0` the workers persist across
epochs with their own RNG streams, so a resumed run's augmentations differ too.

On SIGTERM Lightning stops at the next batch boundary by raising `SIGTERMException`.
`PreemptionCheckpoint` saves `checkpoints/preempted.ckpt` at that point, and `train` then ends the
process with a non-zero status and the command that resumes the run (`preempted`).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import os
import random
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict
from torch import nn

from kdlab.errors import KdlabError

log = logging.getLogger(__name__)

# Where a checkpoint keeps what Lightning does not: the teacher and the W&B run id.
RECORD_KEY = "kdlab"
PREEMPTED = "preempted.ckpt"
LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
HPC_PATTERN = "hpc_ckpt_*.ckpt"  # Lightning's SLURM checkpoints, in the Trainer's default_root_dir


# ------------------------------------------------------------------ a run that has finished
# ckpt_path values that continue the run in its own directory: `last` requires a checkpoint there;
# `auto` starts afresh without one, so rerunning a sweep's command finishes only what is missing.
IN_PLACE = ("last", "auto")


def resumes_in_place(cfg: DictConfig) -> bool:
    return str(cfg.get("ckpt_path")) in IN_PLACE


def finished_run(cfg: DictConfig, run_dir: Path) -> str | None:
    """If `ckpt_path=last` (or auto) asks to resume the run in `run_dir` and that run has finished,
    what to tell the user; else None.

    Finished: it wrote metrics.json, and its newest checkpoint has reached the configured
    trainer.max_epochs (or max_steps). Such a run is left exactly as it is: resuming it would rerun
    the test and rewrite its results from a fit that trains nothing. A larger max_epochs resumes it.
    """
    metrics = run_dir / "metrics.json"
    if not resumes_in_place(cfg) or not metrics.is_file():
        return None
    # The default checkpoint folder: this is also asked before Hydra runs, when `callbacks.*.dirpath`
    # (under the run directory) cannot be resolved yet.
    checkpoint = run_dir / "checkpoints" / LAST
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
        epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps") or -1
        more_epochs = epochs not in (None, -1) and state.get("epoch", -1) + 1 < int(epochs)
        more_steps = steps > 0 and state.get("global_step", 0) < int(steps)
        if more_epochs or more_steps:
            return None
    return (
        f"The run in {run_dir} has already finished (it trained for the configured trainer.max_epochs), "
        f"so there is nothing to resume, and nothing in it was changed. Its results are in {metrics}. To "
        "train it for longer, resume it with a larger trainer.max_epochs (and the run's other overrides)."
    )


# ------------------------------------------------------------------ what to resume from
# Where kdlab.stages keeps the state of the stages some losses run before the main fit.
STAGES_DIR = "stages"


@dataclass
class ResumePoint:
    """The checkpoint a run starts from, what kdlab recorded in it, and whether it is this run's own."""

    checkpoint: Path
    record: dict[str, Any] | None
    same_run: bool

    @property
    def wandb_id(self) -> str | None:
        # Only a run resumed in place continues its W&B run; a run started from another's checkpoint is new.
        return (self.record or {}).get("wandb_id") if self.same_run else None


def resume_point(cfg: DictConfig, output_dir: Path) -> ResumePoint | None:
    """Resolve `ckpt_path` (null, `last` or a file) for the run whose directory is `output_dir`."""
    requested = cfg.get("ckpt_path")
    if requested is None:
        # Lightning itself resumes a requeued SLURM job from the checkpoint in its directory.
        found = newest_checkpoint(cfg, output_dir) if SLURMEnvironment.detect() else None
        if found is None:
            return None
    elif str(requested) in IN_PLACE:
        found = newest_checkpoint(cfg, output_dir)
        if found is None and (output_dir / STAGES_DIR).is_dir():
            return None  # stopped in a stage before the main fit: the stages resume themselves
        if found is None and str(requested) == "auto":
            return None  # nothing to resume: a fresh start
        if found is None:
            raise KdlabError(
                f"ckpt_path=last found no checkpoint to resume in the run directory {output_dir}: it "
                f"looked for {', '.join(str(p) for p in candidate_paths(cfg, output_dir))}. To resume "
                "a run, point at its directory: `hydra.run.dir=<its run directory> ckpt_path=last` (or its "
                "paths.output_dir, if that was set). To start from a checkpoint file, give its path: "
                "ckpt_path=<file>."
            )
    else:
        found = Path(str(requested)).expanduser()
        if not found.is_file():
            raise KdlabError(
                f"ckpt_path={requested}: there is no such file (looked at {found.absolute()}). Give the "
                "path of a Lightning checkpoint, e.g. <run dir>/checkpoints/last.ckpt, or resume a run in "
                "place with `hydra.run.dir=<its run directory> ckpt_path=last`."
            )
    same_run = found.resolve().is_relative_to(output_dir.resolve())
    return ResumePoint(found, read_record(found), same_run)


def candidate_paths(cfg: DictConfig, output_dir: Path) -> list[Path]:
    """Where a run's checkpoints are: every callback's `dirpath`, and the Trainer's root for SLURM's."""
    callbacks = [node for node in (cfg.get("callbacks") or {}).values() if node and node.get("dirpath")]
    dirs = dict.fromkeys(Path(node.dirpath) for node in callbacks)
    root = Path(cfg.trainer.get("default_root_dir") or output_dir)
    return [*(d / name for d in dirs for name in (LAST, PREEMPTED)), root / HPC_PATTERN]


def newest_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The most recently written checkpoint of the run, as Lightning's own `ckpt_path="last"` picks."""
    found = [p for pattern in candidate_paths(cfg, output_dir) for p in pattern.parent.glob(pattern.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_record(path: Path) -> dict[str, Any] | None:
    """kdlab's record in a Lightning checkpoint (None if it has none); a clear error if it is not one."""
    try:
        # Memory-mapped: only the small record is read here; Lightning loads the tensors itself.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:
        raise KdlabError(
            f"Cannot resume from {path}: it is not a readable checkpoint ({type(error).__name__}: "
            f"{error}). It may have been cut short while being written; resume from another "
            "checkpoint of the run, e.g. ckpt_path=<run dir>/checkpoints/last.ckpt."
        ) from None
    if not isinstance(checkpoint, dict) or "loops" not in checkpoint or "state_dict" not in checkpoint:
        raise KdlabError(
            f"Cannot resume from {path}: it holds weights only, not a training state (optimizer, epoch). "
            "Resume from a checkpoint in a run's checkpoints/ directory; to start a new run from these "
            "weights, use student.checkpoint=<file> (or teacher.checkpoint=<file>)."
        )
    return checkpoint.get(RECORD_KEY)


# ------------------------------------------------------------------ the teacher's identity
def teacher_identity(record: Any, teacher: nn.Module, architecture: str) -> dict[str, Any]:
    """Which teacher a run distils from, as plain data: where it came from, and its weights' digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return {
        "architecture": architecture,
        "source": record.source,
        "path": record.path,
        "key": record.key,
        "sha256": digest.hexdigest(),
    }


def check_teacher(point: ResumePoint | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume a run with another teacher than the one its checkpoint was made with."""
    if point is None:
        return
    if point.record is None:
        log.warning(
            "%s holds no kdlab record (not written by kdlab?): its teacher is not checked", point.checkpoint
        )
        return
    saved = point.record.get("teacher")
    if (saved or {}).get("sha256") == (current or {}).get("sha256"):
        return
    hint = (
        f"To resume with the original teacher, set teacher.checkpoint={saved['path']}"
        if saved
        else "That checkpoint was made without a pretrained teacher (its mode trains all its models)"
    )
    raise KdlabError(
        f"Cannot resume from {point.checkpoint}: it was made with the teacher {describe(saved)}, but the "
        f"configured teacher is now {describe(current)}, whose weights differ, so the run would go on "
        f"distilling from another teacher than the one it started with. {hint} (changing "
        "trainer.max_epochs changes the teacher too, since teacher_training.trainer.max_epochs follows "
        "it). To distil from the new teacher, start a new run without ckpt_path."
    )


def describe(teacher: dict[str, Any] | None) -> str:
    if not teacher:
        return "(none)"
    return f"{teacher['architecture']} ({teacher['source']}: {teacher['path']})"


class RunRecord(L.Callback):
    """Writes kdlab's record into every checkpoint: the teacher's identity and the W&B run id."""

    def __init__(self, teacher: dict[str, Any] | None):
        self.teacher = teacher

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        wandb_ids = [logger.version for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        checkpoint[RECORD_KEY] = {"teacher": self.teacher, "wandb_id": next(iter(wandb_ids), None)}


# ------------------------------------------------------------------ continuing the logs
def logger_config(cfg: DictConfig, point: ResumePoint | None) -> DictConfig:
    """The config to build the loggers from: W&B loggers of a run resumed in place get its run id."""
    if point is None or point.wandb_id is None:
        return cfg
    resumed = copy.deepcopy(cfg)
    with open_dict(resumed):
        for node in resumed.logger.values():
            if node and node._target_.endswith("WandbLogger"):
                node.id = point.wandb_id
                node.resume = "allow"  # WandbLogger's default, spelled out because it is relied on
    return resumed


@rank_zero_only  # the one process that writes the CSV file
def continue_csv_logs(loggers: list[Logger], point: ResumePoint | None) -> None:
    """Keep the rows a CSV logger wrote before the interruption; the resumed run appends to them.

    Lightning's CSV writer deletes an existing metrics.csv when it starts, so the file is moved
    aside while the writer starts, then put back, and the writer is told the file's columns.
    """
    if point is None or not point.same_run:
        return
    for logger in loggers:
        metrics = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
        if metrics is None or not metrics.is_file():
            continue
        kept = metrics.with_name(f".{metrics.name}.resumed")
        os.replace(metrics, kept)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*Previous log files in this directory will be deleted"
            )
            writer = logger.experiment
        os.replace(kept, metrics)
        with metrics.open(newline="") as file:
            writer.metrics_keys = next(csv.reader(file), [])


# ------------------------------------------------------------------ randomness per epoch
class EpochSeed(L.Callback):
    """Seeds Python's, NumPy's and torch's RNGs from (seed, epoch) as each training epoch starts.

    The epoch's dropout masks, sampled negatives and in-process augmentations then follow from
    (seed, epoch) alone, whatever ran before: an earlier epoch, or a restart from a checkpoint.
    The loaders draw nothing from these RNGs before the epoch's first batch (the train sampler
    and the loader carry their own generators), so the resumed and the uninterrupted run
    consume the same stream from here.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A SeedSequence, not seed + epoch: seed 1's epoch 0 must not replay seed 0's epoch 1.
        seed = int(np.random.SeedSequence([self.seed, trainer.current_epoch]).generate_state(1, np.uint64)[0])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # every device's generator too


# ------------------------------------------------------------------ preemption
class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, saves `<dirpath>/preempted.ckpt` before the run exits.

    Lightning handles SIGTERM itself: it finishes the current batch, raises `SIGTERMException`
    and calls every callback's `on_exception`, where this saves the state, a consistent one
    since no batch is half done. The file is written under a temporary name and renamed, so a
    run killed while saving it leaves no truncated checkpoint for `ckpt_path=last` to pick. It is
    deleted once a resumed fit finishes, when `last.ckpt` supersedes it.
    """

    def __init__(self, dirpath: str | os.PathLike):
        self.path = Path(dirpath) / PREEMPTED

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{PREEMPTED}.partial")
        trainer.save_checkpoint(partial)  # every rank takes part; only rank zero writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)
            log.warning(
                "SIGTERM: saved the training state at epoch %d, step %d in %s",
                trainer.current_epoch,
                trainer.global_step,
                self.path,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls teardown only after a fit that ended normally.
        if stage == TrainerFn.FITTING and trainer.is_global_zero:
            self.path.unlink(missing_ok=True)


class Preempted(SIGTERMException):
    """The run stopped on SIGTERM; the message says how to resume it.

    A SystemExit, like Lightning's SIGTERMException: it ends the process with a non-zero status and
    the message on stderr, and it is not an Exception, so a multirun stops here instead of going
    on to its next job (kdlab.sweeps keeps a failing job's Exception from ending the sweep).
    """


def preempted(cfg: DictConfig, output_dir: Path) -> Preempted:
    """The exit for a run stopped by SIGTERM: where its state is, and the command that resumes it."""
    saved = newest_checkpoint(cfg, output_dir)
    command = resume_command(saved is not None)
    if saved is None:
        message = (
            "Stopped by SIGTERM before the run had saved a checkpoint, so there is nothing to resume. "
            f"Start it again:\n  {command}"
        )
    else:
        message = (
            f"Stopped by SIGTERM; the training state is saved in {saved}. Resume the run with:\n  {command}"
        )
    return Preempted(message)


def resume_command(resumable: bool) -> str:
    """This run's command line, plus `hydra.run.dir=<its directory> ckpt_path=last` when resumable."""
    if not HydraConfig.initialized():  # called from Python, not from the command line
        return "the same configuration again, with ckpt_path=last" if resumable else "the same configuration"
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    if resumable:
        overrides += [f"hydra.run.dir={Path(hydra_cfg.runtime.output_dir).absolute()}", "ckpt_path=last"]
    return shlex.join([sys.executable, "-m", "kdlab.run", *overrides])
