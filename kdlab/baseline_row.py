"""The student trained alone, printed beside the distilled one: what a distillation result is read against.

A distilled student's accuracy means little without the same architecture trained without a teacher,
on the same data, budget, optimizer and seed. With `baseline_row=true` (the default) a run of a scheme
that distils into one student obtains that model from the teacher store, where it is trained once
(the baseline scheme, with the run's trainer, optimizer and scheduler settings and the run's `seed`,
kept at its best validation epoch as a run's student is)
and reused by every later run and every method of a sweep that shares those settings. The results
table then has a `baseline` row, and the gain in top-1 is printed under it. Its key is the teacher
store's (kdlab.teachers.teacher_spec) with the student's architecture and the run's settings, so
`seed=1,2,3` stores three baselines, one per seed, each paired with the student of that seed.
"""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.build import build_model, build_scheme, build_trainer
from kdlab.teachers import (
    BASELINE,
    SINGLE_PROCESS,
    TeacherRecord,
    TeacherStore,
    selection_metric,
    teacher_spec,
    train_teacher,
)

log = logging.getLogger(__name__)

NAME = "baseline"  # its row in the results table, and its metrics: test/baseline/top1, ...


def wants_baseline(cfg: DictConfig, scheme_class: type) -> bool:
    """Whether this run gets a baseline row: asked for, and the scheme distils into one `student`."""
    from kdlab.schemes import Baseline
    from kdlab.schemes.student import StudentScheme

    return (
        bool(cfg.get("baseline_row"))
        and issubclass(scheme_class, StudentScheme)
        and scheme_class is not Baseline
    )


def baseline_config(cfg: DictConfig) -> DictConfig:
    """The run's config as the teacher store sees a model to train: the student's architecture, the
    run's own trainer, optimizer and seed (none of `teacher_training`'s overrides)."""
    alone = cfg.copy()
    with open_dict(alone):
        alone.teacher = cfg.student
        alone.teacher_training.trainer = {}
        alone.teacher_training.optimizer = {}
        alone.teacher_training.seed = cfg.seed
        # Extra views are for the distillation losses; the student alone trains without them.
        alone.data.views = {}
    return alone


def student_alone(
    cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherStore
) -> tuple[nn.Module, TeacherRecord]:
    """The stored baseline for this run's student and settings, trained first if there is none."""
    alone = baseline_config(cfg)
    # Marked as kept at its best validation epoch: never the same entry as a last-epoch teacher.
    spec = {**teacher_spec(alone, datamodule), "weights": "best validation epoch"}
    if selection_metric(cfg) != ("top1", "max"):  # chosen by another metric: another baseline
        spec["selected_by"] = list(selection_metric(cfg))
    record = store.fetch_or_train(
        spec,
        lambda entry: train_teacher(alone, datamodule, entry, name=NAME, best_on_validation=True),
    )
    log.info(
        "Baseline %s (the student alone, seed %s): %s from %s",
        cfg.student.name,
        cfg.seed,
        record.source,
        record.path,
    )
    return build_model(cfg.student, checkpoint=record.path).eval().requires_grad_(False), record


def test_baseline(cfg: DictConfig, datamodule: L.LightningDataModule, model: nn.Module) -> dict[str, float]:
    """Its test metrics (test/baseline/top1, ...), from the baseline scheme's own test step."""
    scheme = build_scheme(
        cfg,
        datamodule,
        None,
        mode=OmegaConf.create({"_target_": BASELINE}),
        student=model,
        dot=False,
        model_name=NAME,
    )
    trainer = build_trainer(cfg, SINGLE_PROCESS, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.test(scheme, datamodule=datamodule, verbose=False)
    datamodule.trainer = None  # the run's trainer owns the datamodule again
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def gain_line(metrics: dict[str, float], student: str = "student") -> str | None:
    """One sentence under the table: the distilled student's top-1 minus the baseline's, in points (for a
    language model: its perplexity against the baseline's)."""
    distilled, alone = metrics.get(f"test/{student}/perplexity"), metrics.get(f"test/{NAME}/perplexity")
    if distilled is not None and alone is not None:
        return (
            f"Against the student alone (same data, budget and seed): test perplexity {distilled:.3f} vs "
            f"{alone:.3f} ({100 * (distilled / alone - 1):+.2f}%; lower is better). One seed is not "
            "evidence: compare over seeds (scripts/summarize.py)."
        )
    distilled, alone = metrics.get(f"test/{student}/top1"), metrics.get(f"test/{NAME}/top1")
    if distilled is None or alone is None:
        return None
    return (
        f"Gain over the student alone (same data, budget and seed): {100 * (distilled - alone):+.2f} points "
        "of test top-1. One seed is not evidence: compare over seeds (scripts/summarize.py)."
    )
