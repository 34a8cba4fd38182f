"""What the console shows during a run: what a researcher reads, and little else.

The console keeps progress bars, kdlab's own lines (which teacher was used, where the outputs
went), the results table and warnings; the rest goes to the run directory's run.log only:
- Lightning's INFO lines (seeds, "GPU available", tips, "`Trainer.fit` stopped", model summaries).
  Hydra's job logging sends every record to both the console and run.log, Lightning's included
  (conf/hydra/default.yaml); `setup` filters Lightning's INFO records off the console handler.
- Model summaries. With `rich` installed, Lightning's default summary is a table printed straight
  to the terminal, not logged; unless `trainer.enable_model_summary` is set, it is replaced by
  Lightning's plain ModelSummary callback, which logs the table (to run.log).
- Repeats of a warning. Python shows a warning once per code location, but forgets what it showed
  whenever a warnings filter changes (any `warnings.catch_warnings()` block does: torch and
  Lightning have many), and the "once" filter action does too (CPython keeps its memory in the
  same per-module registry). So `setup` wraps `warnings.showwarning`, the documented hook for how
  warnings are shown, to show each text once per process.

`verbose=true` (or `-v` on the command line, see kdlab/cli.py) keeps the full console output.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

from omegaconf import DictConfig, open_dict

# Loggers whose INFO records are run.log material (their warnings still reach the console): Lightning's,
# and the language models' samples (also in the run directory's samples.md).
QUIET_LOGGERS = ("lightning", "pytorch_lightning", "kdlab.generation")
MODEL_SUMMARY = "lightning.pytorch.callbacks.ModelSummary"


class LibraryInfoFilter(logging.Filter):
    """Drops the INFO (and DEBUG) records of QUIET_LOGGERS; keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = any(record.name == name or record.name.startswith(f"{name}.") for name in QUIET_LOGGERS)
        return not quiet or record.levelno >= logging.WARNING


def setup(cfg: DictConfig) -> None:
    """Set the console up for the job `cfg`; called as each job starts, after Hydra's job logging."""
    verbose = bool(cfg.get("verbose"))
    for handler in logging.getLogger().handlers:
        # The console handler streams to stdout/stderr; run.log's FileHandler is a StreamHandler too.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            for old in [f for f in handler.filters if isinstance(f, LibraryInfoFilter)]:
                handler.removeFilter(old)  # a multirun sets each job up (and may change verbose)
            if not verbose:
                handler.addFilter(LibraryInfoFilter())
    if verbose:
        if isinstance(warnings.showwarning, ShowOnce):
            warnings.showwarning = warnings.showwarning.show
        return
    if not isinstance(warnings.showwarning, ShowOnce):
        warnings.showwarning = ShowOnce(warnings.showwarning)
    _logged_model_summary(cfg)


class ShowOnce:
    """A `warnings.showwarning` that shows each warning (text and category) once per process."""

    def __init__(self, show: Callable[..., None]):
        self.show = show
        self.shown: set[tuple[str, type]] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if (str(message), category) not in self.shown:
            self.shown.add((str(message), category))
            self.show(message, category, filename, lineno, file, line)


def _logged_model_summary(cfg: DictConfig) -> None:
    """Model summaries to run.log rather than printed on the console (see the module docstring)."""
    trainer = cfg.get("trainer")
    if trainer is None or trainer.get("enable_model_summary") is not None:
        return  # set explicitly: the user's choice stands
    trainer.enable_model_summary = False  # no default (rich) summary, for the teacher's Trainer too
    callbacks = cfg.get("callbacks") or {}
    if not any(node and node.get("_target_") == MODEL_SUMMARY for node in callbacks.values()):
        with open_dict(cfg):
            if cfg.get("callbacks") is None:
                cfg.callbacks = {}
            cfg.callbacks.model_summary = {"_target_": MODEL_SUMMARY}
