"""Multiruns that survive a failing job, and the summary printed at the end of a sweep.

Hydra's basic sweeper runs a batch of jobs and then raises the first failure it finds: the
other failures go unreported, no end-of-sweep callback runs, and with
`hydra.sweeper.max_batch_size` set the later batches never start. So under that sweeper
`run_or_record_failure` keeps a failing job's exception away from Hydra: it logs it, writes
`<job dir>/failed.json` and returns None. Sweepers that count failures themselves (Optuna's
`max_failure_rate`) must see the exception, so there it is recorded and raised again.

`SweepSummary` (registered in conf/hydra/default.yaml) prints, once every job has run, how
many jobs ran, which failed and why, and where the results are; after a plain multirun with
a failed job it exits non-zero so that scripts and CI notice.

`ResumingTPESampler` makes a resumed Optuna study (conf/hparams_search/) explore new points.
The same job-directory readers serve scripts/summarize.py.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kdlab.errors import KdlabError

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILED_FILE = "failed.json"
METRICS_FILE = "metrics.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def catches_failures(hydra_cfg: DictConfig) -> bool:
    """Whether a failing job is kept from the sweeper: only Hydra's basic one, which has no failure budget."""
    return hydra_cfg.sweeper.get("_target_") == BASIC_SWEEPER


def run_or_record_failure(task: Callable[[], T], knowledge: list[str]) -> T | None:
    """Run one Hydra job; in a multirun, a failure is written to failed.json instead of ending the sweep.
    `knowledge` (the job's knowledge terms) goes into failed.json, so a table can name the failed
    configuration as it names a finished one."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return task()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    # A re-run into the same directory must not inherit an earlier attempt's failure.
    (job_dir / FAILED_FILE).unlink(missing_ok=True)
    try:
        return task()
    except Exception as error:  # not KeyboardInterrupt: Ctrl-C still stops the whole sweep
        method = {"mode": hydra_cfg.runtime.choices.get("mode"), "knowledge": knowledge}
        _record_failure(job_dir, list(hydra_cfg.overrides.task), method, error)
        if not catches_failures(hydra_cfg):
            raise
        if isinstance(error, KdlabError):  # bad input: the message says it all
            log.error("Job %s failed: %s", hydra_cfg.job.num, error)
        else:  # a bug or a crash (e.g. out of memory): the traceback is needed
            log.exception("Job %s failed", hydra_cfg.job.num)
        log.error("The sweep goes on; details in %s", job_dir / FAILED_FILE)
        return None


def _record_failure(job_dir: Path, overrides: list[str], method: dict, error: BaseException) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    failure = {
        "overrides": overrides,
        **method,  # the scheme and knowledge terms the job composed, defaults included
        "error": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    (job_dir / FAILED_FILE).write_text(json.dumps(failure, indent=2))


# ---------------------------------------------------------------- Optuna
class ResumingTPESampler:
    """Optuna's TPESampler, seeded with `seed` plus the number of the first trial it samples.

    A fresh study gets exactly TPESampler(seed). A resumed one (conf/hparams_search/) would,
    with that same seed, repeat its first random start-up suggestions and waste those trials;
    the number of its first new trial is the count of trials already stored, so it continues
    with fresh draws, still reproducibly. Optuna's sampler interface is implemented by
    delegation, so that this module imports without the optional `sweep` extra (optuna 2.10
    never checks a sampler's type).
    """

    def __init__(self, seed: int | None, **tpe_kwargs: Any) -> None:
        self._seed, self._tpe_kwargs, self._tpe = seed, tpe_kwargs, None

    def _sampler(self, trial: Any) -> Any:
        if self._tpe is None:  # the first trial of this process: the study is open by now
            import optuna

            seed = None if self._seed is None else self._seed + trial.number
            self._tpe = optuna.samplers.TPESampler(seed=seed, **self._tpe_kwargs)
        return self._tpe

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, distribution: Any) -> Any:
        return self._sampler(trial).sample_independent(study, trial, param_name, distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._tpe is not None:
            self._tpe.reseed_rng()


# ---------------------------------------------------------------- reading job directories
def job_dirs(root: Path) -> list[Path]:
    """Every Hydra job directory below root (each has .hydra/overrides.yaml), in job order."""
    found = {path.parent.parent for path in root.rglob(OVERRIDES_FILE.name) if path.parent.name == ".hydra"}
    return sorted(found, key=lambda path: _natural_key(path.relative_to(root).parts))


def read_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides as Hydra saved them; [] for a run without .hydra/."""
    path = job_dir / OVERRIDES_FILE
    return list(yaml.safe_load(path.read_text()) or []) if path.exists() else []


def override_dict(overrides: Iterable[str]) -> dict[str, str]:
    """`key=value` overrides as {key: value}; `+key` and `++key` count as `key`."""
    pairs = (override.split("=", 1) for override in overrides if "=" in override)
    return {key.lstrip("+"): value for key, value in pairs}


def varying_keys(configs: list[dict[str, str]]) -> list[str]:
    """The keys whose value (or presence) is not the same in every config, in first-seen order."""
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if len({config.get(key) for config in configs}) > 1]


def _natural_key(parts: tuple[str, ...]) -> tuple:
    # Job 10 after job 9, not after job 1.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)


# ---------------------------------------------------------------- the end-of-sweep summary
class SweepSummary(Callback):
    """Prints the sweep's outcome; exits non-zero after a plain multirun in which a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        jobs = job_dirs(sweep_dir) if sweep_dir.is_dir() else []
        failed = [job for job in jobs if (job / FAILED_FILE).exists() or not (job / METRICS_FILE).exists()]
        print(summary_text(sweep_dir, jobs, failed), flush=True)
        if failed and catches_failures(config.hydra):
            # Hydra ignores exceptions raised by callbacks, so only SystemExit can set the exit
            # status. Hydra notifies on_multirun_end in reverse order and this callback comes
            # first in conf/hydra/default.yaml, so the callbacks a user adds have already run.
            sys.exit(
                f"{len(failed)} of {len(jobs)} jobs failed (listed above); the other jobs' results "
                f"are in {sweep_dir}. Fix the cause and re-run only the failed overrides."
            )


def summary_text(sweep_dir: Path, jobs: list[Path], failed: list[Path]) -> str:
    """What the user reads after a sweep: counts, each failure's overrides and error, where to look."""
    lines = [f"Sweep finished: {len(jobs)} jobs, {len(jobs) - len(failed)} succeeded, {len(failed)} failed."]
    # Name a job by the overrides that set it apart from the others (all of them in a one-job sweep).
    overrides = {job: override_dict(read_overrides(job)) for job in jobs}
    shown = varying_keys(list(overrides.values())) or list(
        dict.fromkeys(k for o in overrides.values() for k in o)
    )
    for job in failed:
        label = " ".join(f"{key}={overrides[job][key]}" for key in shown if key in overrides[job])
        lines.append(f"  FAILED job {job.relative_to(sweep_dir)}: {label or '(no overrides)'}")
        lines.append(f"    {_first_line_of_error(job)}")
    lines.append(f"Results: {sweep_dir}/<job>/{METRICS_FILE}")
    lines.append(f"Table over seeds: python scripts/summarize.py {sweep_dir}")
    if (sweep_dir / "optimization_results.yaml").exists():  # written by the Optuna sweeper
        lines.append(f"Best trial: {sweep_dir / 'optimization_results.yaml'}")
    return "\n".join(lines)


def _first_line_of_error(job: Path) -> str:
    path = job / FAILED_FILE
    if not path.exists():
        return f"no {METRICS_FILE} and no {FAILED_FILE}: the job was interrupted ({job / 'run.log'})"
    failure = json.loads(path.read_text())
    first = (failure["message"].strip().splitlines() or [""])[0]
    return f"{failure['error']}: {first} ({path})"
