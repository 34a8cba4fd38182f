"""The entry point: `python -m kdlab.run mode=offline knowledge=response ...`.

Builds everything from the composed Hydra config (conf/run.yaml), obtains a teacher when
the scheme needs one, fits, tests, prints the results table, writes `metrics.json` in the
run directory, and returns the metric a sweep optimises (`optimized_metric`).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kdlab.allocator import tune_malloc
from kdlab.build import (
    build_callbacks,
    build_knowledge,
    build_model,
    build_scheme,
    build_trainer,
    instantiate,
    scheme_class,
)
from kdlab.errors import KdlabError
from kdlab.loggers import build_loggers, finish_loggers
from kdlab.report import format_table, log_table, model_rows, write_metrics
from kdlab.resume import (
    EpochSeed,
    ResumePoint,
    RunRecord,
    check_teacher,
    continue_csv_logs,
    logger_config,
    preempted,
    resume_point,
    teacher_identity,
)
from kdlab.sweeps import run_or_record_failure
from kdlab.teacher_cache import cache_callback
from kdlab.teachers import obtain_generations, obtain_teacher, record_dict

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per fit: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run from a composed config; returns the results that go to metrics.json.

    With `ckpt_path` set, the run resumes (in place) or starts from a checkpoint: see kdlab.resume.
    """
    if cfg.get("tune_malloc"):
        tune_malloc()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Resolved before the loggers exist: a run resumed in place continues its W&B run and CSV file.
    start = resume_point(cfg, output_dir)
    loggers = build_loggers(logger_config(cfg, start))
    failed = True
    try:
        continue_csv_logs(loggers, start)
        results = _train(cfg, loggers, output_dir, start)
        failed = False
        return results
    except SIGTERMException:  # Lightning stopped the fit at a batch boundary; the state is saved
        raise preempted(cfg, output_dir) from None
    finally:
        finish_loggers(loggers, failed=failed)


def _train(
    cfg: DictConfig, loggers: list, output_dir: Path, start: ResumePoint | None = None
) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    knowledge = build_knowledge(cfg)  # before any teacher training: bad options fail fast
    record, sources = None, {}
    role = scheme_class(cfg).teacher_role
    if role == "pretrained":
        sources["teacher"], record = obtain_teacher(cfg, datamodule)
        # Re-seed: the student's init must not depend on whether the teacher was just trained.
        L.seed_everything(cfg.seed, workers=True)
    elif role == "generations":
        sources["teacher"], sources["earlier"], records = obtain_generations(cfg, datamodule)
        record = records[-1]
        L.seed_everything(cfg.seed, workers=True)
    elif role == "peer":
        sources["teacher"] = build_model(cfg.teacher)  # a fresh, trainable peer
    elif cfg.get("knowledge"):
        log.info(
            "mode=%s trains with the task loss only; knowledge=%s is not used.",
            cfg.mode._target_.rsplit(".", 1)[-1],
            list(cfg.knowledge),
        )
    # The frozen teacher's identity goes into every checkpoint; a resume must use the same one.
    teacher, architecture = None, cfg.student if role == "generations" else cfg.teacher
    if record is not None:
        teacher = teacher_identity(record, sources["teacher"], architecture.name)
    check_teacher(start, teacher)
    scheme = build_scheme(cfg, datamodule, knowledge, **sources)
    # Seeding per epoch and the run record are part of every run, whatever `callbacks=` holds.
    callbacks = [*build_callbacks(cfg), EpochSeed(cfg.seed), RunRecord(teacher)]
    if record is not None:  # a frozen teacher: its outputs may come from the cache
        cache = cache_callback(cfg, scheme, datamodule, teacher["sha256"], architecture)
        if cache is not None:
            callbacks.append(cache)
    trainer = build_trainer(cfg, logger=loggers, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "teacher_used": record_dict(record)}
        )

    trainer.fit(scheme, datamodule=datamodule, ckpt_path=start.checkpoint if start else None)
    metrics = _floats(trainer.callback_metrics)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    # By path: "best" would make Lightning warn that more than one ModelCheckpoint is configured.
    trainer.test(scheme, datamodule=datamodule, ckpt_path=best or None)
    metrics.update(_floats(trainer.callback_metrics))

    student_file = output_dir / "student.pt"  # loadable with student.checkpoint= or teacher.checkpoint=
    if trainer.is_global_zero:  # under DDP every rank gets here; one writes the outputs
        torch.save(
            {"state_dict": scheme.deployable().state_dict(), "architecture": cfg.student.name}, student_file
        )

    architectures = {"student": cfg.student.name, "teacher": cfg.teacher.name}
    architectures.update({f"peer{i + 3}": name for i, name in enumerate(cfg.mode.get("extra_peers") or [])})
    if role == "generations":  # every generation has the student's architecture
        architectures.update({name: cfg.student.name for name in ("teacher", *sources["earlier"])})
    # Entries tested without a module of their own (an ensemble, exits) get rows too.
    extra = [name for name in scheme.test_metrics if name not in scheme.models()]
    rows = model_rows(scheme.models(), architectures, metrics, extra)
    results = {
        "run_dir": str(output_dir),
        "mode": cfg.mode._target_.rsplit(".", 1)[-1].lower(),
        "knowledge": list(scheme.templates),
        "teacher": record_dict(record),
        "checkpoint": best or None,
        "student_weights": str(student_file),
        "models": rows,
        "metrics": metrics,
    }
    name = cfg.get("optimized_metric")
    results["optimized_metric"] = {"name": name, "value": _finite(metrics.get(name))}
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", results)
        log_table(loggers, rows)
        print(
            f"\n{format_table(rows)}\n\nRun directory: {output_dir}\nMetrics: {output_dir / 'metrics.json'}"
        )
    if name and name not in metrics:  # checked last, so the run's results are written first
        raise KdlabError(
            f"optimized_metric={name!r} was not logged by this run, so a sweep has nothing to "
            f"optimise (the results are in {output_dir / 'metrics.json'}). Set optimized_metric "
            f"to one of: {', '.join(sorted(metrics))}."
        )
    return results


def _floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="run")
def main(cfg: DictConfig) -> float | None:
    # In a multirun, one failing job must not cost the other jobs' results (see kdlab.sweeps).
    return run_or_record_failure(lambda: train(cfg)["optimized_metric"]["value"])


if __name__ == "__main__":
    main()
