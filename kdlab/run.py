"""The entry point: `python -m kdlab.run mode=offline knowledge=response ...`.

Builds everything from the composed Hydra config (conf/run.yaml), obtains a teacher when
the scheme needs one, fits, tests, measures what each model costs to deploy (kdlab.efficiency),
prints the results table, writes `metrics.json` in the run directory, and returns the metric a
sweep optimises (`optimized_metric`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kdlab import console
from kdlab.allocator import tune_malloc
from kdlab.baseline_row import gain_line, student_alone, test_baseline, wants_baseline
from kdlab.build import (
    build_callbacks,
    build_knowledge,
    build_scheme,
    build_trainer,
    instantiate,
    scheme_class,
)
from kdlab.cli import command_line
from kdlab.cuda_probe import drop_failing_nvml_probe
from kdlab.efficiency import measure_models, ratio_line
from kdlab.errors import KdlabError
from kdlab.knowledge import views_of
from kdlab.loggers import build_loggers, finish_loggers
from kdlab.report import format_table, log_table, model_rows, write_metrics
from kdlab.resume import (
    EpochSeed,
    ResumePoint,
    RunRecord,
    check_teacher,
    continue_csv_logs,
    finished_run,
    logger_config,
    preempted,
    resume_point,
    teacher_identity,
)
from kdlab.schemes.base import SEPARATE_HEADS
from kdlab.stages import format_stages, run_stages
from kdlab.sweeps import run_or_record_failure
from kdlab.tasks import LanguageModeling, task_of
from kdlab.teacher_cache import cache_callback
from kdlab.teachers import TeacherStore, record_dict

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per fit: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
CONFIG_DIR = "pkg://kdlab.conf"  # the top-level conf/, installed as kdlab.conf (see pyproject.toml)


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run from a composed config; returns the results that go to metrics.json.

    With `ckpt_path` set, the run resumes (in place) or starts from a checkpoint: see kdlab.resume.
    """
    if cfg.get("tune_malloc"):
        tune_malloc()
    drop_failing_nvml_probe()
    output_dir = Path(cfg.paths.output_dir)
    if notice := finished_run(cfg, output_dir):
        print(notice)
        return json.loads((output_dir / "metrics.json").read_text())
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
    # The scheme obtains what it learns from: a frozen teacher, generations, fresh peers, or nothing.
    store = TeacherStore(cfg.teacher_training.store)
    scheme_class(cfg).check_task(task_of(datamodule))  # before any teacher is trained for it
    sources = scheme_class(cfg).sources_for(cfg, datamodule, store)
    # What the distilled student is read against: the student alone, stored like a teacher.
    baseline = student_alone(cfg, datamodule, store) if wants_baseline(cfg, scheme_class(cfg)) else None
    # After the sources: a teacher trained meanwhile has no use for the extra views.
    datamodule.use_views(views_of(knowledge.values()), "knowledge=" + ",".join(knowledge))
    record, teacher = sources.frozen, None
    if record is not None or baseline is not None:
        # Re-seed: the student's init must not depend on whether a teacher or baseline was just trained.
        L.seed_everything(cfg.seed, workers=True)
    if record is not None:
        # The frozen teacher's identity goes into every checkpoint; a resume must use the same one.
        teacher = teacher_identity(record, sources.modules["teacher"], sources.frozen_config.name)
    check_teacher(start, teacher)
    scheme = build_scheme(cfg, datamodule, knowledge, sources.modules)
    # Seeding per epoch and the run record are part of every run, whatever `callbacks=` holds.
    callbacks = [*build_callbacks(cfg), EpochSeed(cfg.seed), RunRecord(teacher)]
    if record is not None:  # a frozen teacher: its outputs may come from the cache
        cache = cache_callback(cfg, scheme, datamodule, teacher["sha256"], sources.frozen_config)
        if cache is not None:
            callbacks.append(cache)
    trainer = build_trainer(cfg, logger=loggers, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "teacher_used": record_dict(record)}
        )

    started = time.perf_counter()  # the student's training and testing, not the teacher's or baseline's
    # The stages some losses run first (AB's initialisation, FT's paraphraser); see kdlab.stages.
    stages = run_stages(
        cfg,
        scheme,
        datamodule,
        output_dir,
        from_checkpoint=start is not None,
        callbacks=[EpochSeed(cfg.seed), RunRecord(teacher)],
        teacher=teacher,
    )
    trainer.fit(scheme, datamodule=datamodule, ckpt_path=start.checkpoint if start else None)
    metrics = _floats(trainer.callback_metrics)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if cfg.get("test_last_epoch") and best:
        # The weights the fit ended with, before the best checkpoint replaces them (the CRD
        # protocol's figures are last-epoch ones): test_last/<model>/<metric>.
        trainer.test(scheme, datamodule=datamodule, verbose=False)
        metrics.update(
            {
                f"test_last/{k[5:]}": v
                for k, v in _floats(trainer.callback_metrics).items()
                if k.startswith("test/")
            }
        )
    # By path: "best" would make Lightning warn that more than one ModelCheckpoint is configured.
    # verbose=False: kdlab prints the results table itself, Lightning's would repeat it.
    trainer.test(scheme, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics.update(_floats(trainer.callback_metrics))
    wall_time = time.perf_counter() - started
    if baseline is not None:
        metrics.update(test_baseline(cfg, datamodule, baseline[0]))

    # Loadable with student.checkpoint= or teacher.checkpoint=, unless "deployed" (SimKD's: see its docs).
    student_file = output_dir / "student.pt"
    if trainer.is_global_zero:  # under DDP every rank gets here; one writes the outputs
        torch.save(
            {
                "state_dict": scheme.deployable().state_dict(),
                "architecture": scheme.deployed_architecture(cfg.student.name),
                # True when the deployed model is more than the student's architecture (SimKD)
                "deployed": scheme.deployable() is not scheme.trained_models().get("student"),
            },
            student_file,
        )

    architectures = {"student": scheme.deployed_architecture(cfg.student.name), **sources.architectures}
    # Entries tested without a module of their own (an ensemble, exits) get rows too.
    extra = [name for name in scheme.test_metrics if name not in scheme.models()]
    # A head tested alone (DeiT's class and distillation heads): "<the model's architecture>, class head".
    for name in extra:
        owner, _, head = name.partition("_")
        if head in SEPARATE_HEADS and owner in architectures:
            architectures[name] = f"{architectures[owner]}, {head.replace('_', ' ')}"
    models = scheme.models()
    if baseline is not None:  # its row goes just before the student's
        architectures["baseline"] = cfg.student.name
        before, rest = list(models)[:-1], list(models)[-1:]  # the student is the scheme's last model
        models = {**{k: models[k] for k in before}, "baseline": baseline[0], **{k: models[k] for k in rest}}
    # What each network costs to deploy, on the device it was tested on; one process measures.
    efficiency = (
        _efficiency(cfg, scheme, models, trainer.strategy.root_device) if trainer.is_global_zero else None
    )
    rows = model_rows(models, architectures, metrics, extra, efficiency)
    results = {
        "run_dir": str(output_dir),
        "mode": scheme.name,
        "knowledge": list(scheme.templates),
        "teacher": record_dict(record),
        "baseline": record_dict(baseline[1]) if baseline else None,
        "checkpoint": best or None,
        "student_weights": str(student_file),
        "models": rows,
        "efficiency": efficiency,
        "stages": stages,
        "wall_time_s": round(wall_time, 1),
        "metrics": metrics,
    }
    name = cfg.get("optimized_metric")
    results["optimized_metric"] = {"name": name, "value": _finite(metrics.get(name))}
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", results)
        log_table(loggers, rows)
        stage_table = f"\n{format_stages(stages)}\n" if stages else ""
        # Under the table: what the student buys over its teacher, and what it gains over the student alone.
        notes = "\n".join(n for n in (ratio_line(efficiency), gain_line(metrics) if baseline else None) if n)
        table = format_table(rows, cfg.data.batch_size) + (f"\n\n{notes}" if notes else "")
        print(
            f"{stage_table}\n{table}\n\nRun directory: {output_dir}\nMetrics: {output_dir / 'metrics.json'}"
        )
    if name and name not in metrics:  # checked last, so the run's results are written first
        raise KdlabError(
            f"optimized_metric={name!r} was not logged by this run, so a sweep has nothing to "
            f"optimise (the results are in {output_dir / 'metrics.json'}). Set optimized_metric "
            f"to one of: {', '.join(sorted(metrics))}."
        )
    return results


def _efficiency(cfg: DictConfig, scheme, models: dict, device: torch.device) -> dict[str, Any] | None:
    """kdlab.efficiency's record of the models on inputs of the data's shape (images, or token windows),
    at batch 1 and at the training batch size. A model it cannot measure costs the run its figures, not
    its results."""
    task = scheme.task
    try:
        shape = tuple(task.example_input(1).shape[1:])
        vocab = task.num_classes if isinstance(task, LanguageModeling) else None
        return measure_models(models, shape, cfg.data.batch_size, device, vocab_size=vocab)
    except Exception as error:  # noqa: BLE001 (the run's results are written whatever went wrong here)
        log.warning("Could not measure the models' FLOPs, latency and size: %s", error)
        return None


def _floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


CONFIG_NAME = "run"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> float | None:
    console.setup(cfg)  # progress, results and warnings on the console; the rest in run.log
    # In a multirun, one failing job must not cost the other jobs' results (see kdlab.sweeps).
    knowledge = list(cfg.get("knowledge") or {})
    return run_or_record_failure(lambda: train(cfg)["optimized_metric"]["value"], knowledge)


def main() -> None:
    """The `kdlab` command: the command line is checked and rewritten first (kdlab/cli.py)."""
    sys.argv = command_line(sys.argv, hydra_main, CONFIG_DIR, CONFIG_NAME)
    hydra_main()


if __name__ == "__main__":
    main()
