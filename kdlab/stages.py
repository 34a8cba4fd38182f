"""Stages before the main fit: the fits a loss declares (`Knowledge.stages`), run in order.

AB (Heo et al. 2019) first trains the student's layers to reproduce the teacher's activation
boundaries; FT (Kim et al. 2018) first trains a paraphraser on the teacher's features. Each such
stage is a Lightning fit of its own (`StageFit`): the loss's `stage_loss` alone, over the
parameters the stage names, with the run's optimizer at the stage's learning rate, the run's
trainer settings and the run's data and source. The scheme provides the outputs
(`Scheme.stage_outputs`), so a stage sees exactly what the main fit will.

Every stage keeps its state in `<run dir>/stages/<loss>-<stage>/`: `last.ckpt` after each epoch,
then `weights.pt` (the scheme's state when it ended) and `result.json`. With `ckpt_path=last` a
run continues where it stopped: inside a stage from its last.ckpt, after it from weights.pt, or in
the main fit, whose checkpoints hold what the stages trained. The results table lists each stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import Tensor

from kdlab.build import build_trainer
from kdlab.errors import KdlabError
from kdlab.knowledge import Knowledge, Stage
from kdlab.resume import STAGES_DIR, ResumePoint, check_teacher, read_record, resumes_in_place
from kdlab.tables import markdown_table

log = logging.getLogger(__name__)
# A stage has no validation (the main fit validates); Lightning says so once per stage.
warnings.filterwarnings("ignore", message=r".*val_dataloader.*but have no `validation_step`")
RESULT = "result.json"
WEIGHTS = "weights.pt"


class StageFit(L.LightningModule):
    """One stage of one loss as a LightningModule around the scheme (its student and source)."""

    def __init__(self, scheme: L.LightningModule, term_name: str, stage: Stage):
        super().__init__()
        self.scheme = scheme
        self.term_name = term_name
        self.stage = stage

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        student, source = self.scheme.stage_outputs(batch)
        term = self.scheme.knowledge[self.term_name]
        loss = term.stage_loss(self.stage.name, student, source, batch, self.scheme.loss_context())
        self.log("stage_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def train(self, mode: bool = True):
        super().train(mode)  # the scheme's train(): its stage-only modules go to eval ...
        term = self.scheme.knowledge[self.term_name]
        for module in term.stage_modules(self.stage.name):
            module.train(mode)  # ... but this stage trains them
        if not self.stage.trains_student:
            for model in self.scheme.trained_models().values():
                model.eval()  # its forward pass must not move the student's BatchNorm statistics
        return self

    def configure_optimizers(self):
        term = self.scheme.knowledge[self.term_name]
        factory = self.scheme.optimizer_factory
        if self.stage.lr is not None:
            if not isinstance(factory, partial):
                raise KdlabError(
                    f"Stage {self.stage.name} of knowledge.{self.term_name} sets its own learning rate, "
                    "which needs the optimizer config to be a partial (`_partial_: true` in "
                    "conf/optimizer/). Add it, or set the stage's learning rate to null (e.g. "
                    f"knowledge.{self.term_name}.init_lr=null)."
                )
            factory = partial(factory.func, *factory.args, **{**factory.keywords, "lr": self.stage.lr})
        return factory(self.scheme.stage_parameters(term, self.stage))


def stage_dir(output_dir: Path, term_name: str, stage: Stage) -> Path:
    return output_dir / STAGES_DIR / f"{term_name}-{stage.name}"


def run_stages(
    cfg: DictConfig,
    scheme: L.LightningModule,
    datamodule: L.LightningDataModule,
    output_dir: Path,
    from_checkpoint: bool,
    callbacks: list[L.Callback] = (),
    teacher: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or take up again) every stage the scheme's losses declare; their results, in order.

    `from_checkpoint`: the main fit starts from a checkpoint (this run's, or ckpt_path=<file>),
    which holds what the stages trained, so they are not run; this run's finished ones are
    reported. `callbacks` go to each stage's trainer (the run's per-epoch seeding and record), and
    a stage taken up again from its last.ckpt must have been trained with the same `teacher`.
    """
    continuing = resumes_in_place(cfg)
    results = []
    for term_name, template in scheme.templates.items():
        if not template.stages():
            continue
        term = scheme.knowledge[term_name] if term_name in scheme.knowledge else None
        if not isinstance(term, Knowledge):
            scheme.stage_outputs({})  # a scheme with no single student: its clear error
        for stage in term.stages():
            folder = stage_dir(output_dir, term_name, stage)
            done = folder / RESULT
            if from_checkpoint:
                if done.is_file():
                    results.append(json.loads(done.read_text()))
                continue
            if continuing and done.is_file():
                scheme.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
                log.info(
                    "Stage %s of knowledge.%s: done before, its result taken from %s",
                    stage.name,
                    term_name,
                    folder,
                )
                results.append(json.loads(done.read_text()))
                continue
            results.append(
                _fit_stage(cfg, scheme, datamodule, term_name, stage, folder, continuing, callbacks, teacher)
            )
    return results


def _fit_stage(
    cfg: DictConfig,
    scheme: L.LightningModule,
    datamodule: L.LightningDataModule,
    term_name: str,
    stage: Stage,
    folder: Path,
    continuing: bool,
    callbacks: list[L.Callback],
    teacher: dict[str, Any] | None,
) -> dict[str, Any]:
    last = folder / "last.ckpt"
    resume_from = last if continuing and last.is_file() else None
    if resume_from is not None:  # the stage goes on with the teacher it started with, or not at all
        check_teacher(ResumePoint(resume_from, read_record(resume_from), True), teacher)
    if resume_from is None and folder.exists():
        shutil.rmtree(folder)  # a stage of an earlier, unrelated start in this directory
    print(f"Stage {stage.name} of knowledge.{term_name}: {stage.epochs} epochs before the main fit")
    checkpoints = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=0, save_last=True)
    trainer = build_trainer(
        cfg,
        {
            "max_epochs": stage.epochs,
            "max_steps": -1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": True,
        },
        logger=False,
        callbacks=[checkpoints, *callbacks],
    )
    module = StageFit(scheme, term_name, stage)
    with only_these_train(scheme, scheme.stage_parameters(scheme.knowledge[term_name], stage)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    result = {
        "knowledge": term_name,
        "stage": stage.name,
        "epochs": stage.epochs,
        "final_loss": float(trainer.callback_metrics.get("stage_loss", float("nan"))),
    }
    if trainer.is_global_zero:
        torch.save(scheme.state_dict(), folder / WEIGHTS)
        (folder / RESULT).write_text(json.dumps(result, indent=2))
    return result


@contextmanager
def only_these_train(scheme: L.LightningModule, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, only `params` require a gradient (DDP must not wait for the others')."""
    keep = {id(p) for p in params}
    changed = [p for p in scheme.parameters() if p.requires_grad and id(p) not in keep]
    for p in changed:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def format_stages(results: list[dict[str, Any]]) -> str:
    """The stages as a markdown table for the console (empty when there were none)."""
    if not results:
        return ""
    rows = [[r["knowledge"], r["stage"], str(r["epochs"]), f"{r['final_loss']:.4f}"] for r in results]
    return markdown_table(["knowledge", "stage", "epochs", "final loss"], rows)
