"""The console shows what a researcher reads; the rest is in run.log, or on the console with -v
(kdlab/console.py)."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

from omegaconf import OmegaConf

from kdlab import console
from tests.conftest import cli_overrides, run_cli, run_main

# Lightning's INFO lines and its model summary (the plain one in run.log, the rich one on a console).
LIGHTNING_LINES = ("GPU available", "TPU available", "litlogger", "`Trainer.fit` stopped", "Seed set to")
SUMMARY_LINES = ("Trainable params", "Total params")


def tiny_job(tmp_path, teacher_store) -> list[str]:
    """cli_overrides with the model summaries Lightning prints by default."""
    return [
        o for o in cli_overrides(tmp_path, teacher_store=teacher_store) if "enable_model_summary" not in o
    ]


def test_console_shows_results_and_run_log_keeps_the_rest(tmp_path, fashion_mnist, teacher_store):
    proc = run_cli(tiny_job(tmp_path, teacher_store), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    shown = proc.stdout + proc.stderr
    for text in (*LIGHTNING_LINES, *SUMMARY_LINES, "| Name"):
        assert text not in shown, text
    # What a researcher reads: which teacher, the results table, where the outputs are.
    assert "Teacher deepnn:" in shown and str(teacher_store) in shown
    assert "| teacher" in proc.stdout and "| student" in proc.stdout
    assert (
        f"Run directory: {run_dir}" in proc.stdout and f"Metrics: {run_dir / 'metrics.json'}" in proc.stdout
    )
    # Warnings are shown, each once.
    repeated = [line for line, n in Counter(proc.stderr.splitlines()).items() if n > 1 and line.strip()]
    assert not repeated, repeated
    log = (run_dir / "run.log").read_text()
    for text in (*LIGHTNING_LINES[:2], *SUMMARY_LINES, "Teacher deepnn:"):
        assert text in log, text
    assert len(shown.splitlines()) < 30, shown


def test_verbose_shows_everything_on_the_console(tmp_path, fashion_mnist, teacher_store):
    # In this process (the console is the same logging handler either way): -v becomes verbose=true.
    proc = run_main([*tiny_job(tmp_path, teacher_store), "-v"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in LIGHTNING_LINES[:2]:
        assert text in proc.stdout, text
    assert "verbose=true" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()


def test_a_warning_is_shown_once_even_after_the_filters_change():
    def warn_three_times(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")  # Python's own: once per code location
            if quiet:
                console.setup(OmegaConf.create({"verbose": False}))
            for _ in range(3):
                warnings.warn("the same data warning", UserWarning, stacklevel=1)
                with warnings.catch_warnings():  # as libraries do: Python forgets what it showed
                    warnings.simplefilter("ignore", DeprecationWarning)
        return [str(w.message) for w in shown]

    assert warn_three_times(quiet=False) == ["the same data warning"] * 3
    assert warn_three_times(quiet=True) == ["the same data warning"]


def test_lightning_info_is_filtered_off_the_console_only():
    keep = console.LibraryInfoFilter()

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    assert not keep.filter(record("lightning.pytorch.utilities.rank_zero", logging.INFO))
    assert keep.filter(record("lightning.pytorch.utilities.rank_zero", logging.WARNING))
    assert keep.filter(record("kdlab.teachers", logging.INFO))
    assert keep.filter(record("lightningfast", logging.INFO))
