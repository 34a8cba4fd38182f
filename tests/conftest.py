"""Shared test helpers: compose kdlab's real config with small, fast overrides; and the few
expensive runs that several test files inspect, made once per session.

The suite runs on 2 CPU cores in CI, so a run's cost is mostly fixed overhead: a new
interpreter's imports (torch, Lightning: seconds), teacher training, evaluation and figures.
Hence the small budgets here, the CLI run in this process where the process itself is not
what a test is about (`run_main`), and the session-scoped runs and teacher store below.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdlab.models.timm_models import register_choices

# pytest-xdist runs the suite in parallel processes (pyproject.toml's addopts). Each gets its share
# of the cores, and so do the kdlab processes a test starts (they inherit OMP_NUM_THREADS): more
# threads than cores make every process of a 2-core machine wait on the others.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FORTUNES = Path("/usr/share/games/fortunes")


# Drops the figures (kdlab/plots.py, about a second per run on 2 cores) from a run whose test is
# not about them; tests/test_plots.py and tests/test_wandb.py check them in runs that keep them.
NO_PLOTS = "~callbacks.plots"


def fast_overrides(tmp_path: Path, batches: int = 3, teacher_store: Path | None = None) -> list[str]:
    """A run of a few batches of real Fashion-MNIST, writing only under tmp_path (and teacher_store,
    if given: see the `teacher_store` fixture).

    One validation and one test batch: evaluation runs after every fit (the teacher's too) and
    with the frozen teacher alongside, so it is a large share of a short run.
    """
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.teacher_store={teacher_store or tmp_path / 'teachers'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.batch_size=32",
        # The teacher-output cache is its own tests' subject (tests/test_teacher_cache.py and
        # tests/test_cache_views.py, which turn it back on). Elsewhere a session's many runs of one
        # setting would each be "a later run" that builds a whole-split entry (minutes, gigabytes).
        "teacher_cache.enabled=false",
        # The stored student-alone row (kdlab/baseline_row.py) is tested in tests/test_baseline_row.py;
        # elsewhere it would train a second student in every run.
        "baseline_row=false",
        # The default job's teacher trains longer than its student (conf/experiment/quickstart.yaml);
        # here it follows the student's few batches, as it does outside the quickstart.
        "++teacher_training.trainer.max_epochs=${trainer.max_epochs}",
        "++teacher_training.trainer.limit_train_batches=${trainer.limit_train_batches}",
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    register_choices(overrides)  # as the command line does (kdlab/cli.py): `model@student=timm/<name>`
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None):
    """`python -m kdlab.run ARGS` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kdlab.run", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m kdlab.run ARGS` in this process: the same entry point, argument parsing, config
    composition, sweepers and error reporting (Hydra's), without a new interpreter's imports
    (seconds on 2 cores).

    For CLI tests about what Hydra and kdlab do with the command line (--help, --cfg, bad input,
    Optuna studies); `run_cli` runs the real process where that is the point (a job's output,
    exit status, signals). Returns what a subprocess would: the exit status, stdout and stderr.
    """
    from hydra._internal import utils as hydra_utils

    import kdlab.run

    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    status = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [kdlab.run.__file__, *args])
        patch.chdir(cwd)
        for name, value in {"WANDB_MODE": "offline", **(env or {})}.items():
            patch.setenv(name, value)
        # Hydra re-raises instead of reporting when a tracer is set (coverage, a debugger); the
        # CLI a user runs has none.
        patch.setattr(hydra_utils, "is_under_debugger", lambda: False)
        # A job sets Hydra's global config; the later tests expect none (monkeypatch restores it).
        patch.setattr(HydraConfig.instance(), "cfg", None)
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                kdlab.run.main()
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            # A job configures logging (Hydra's job_logging: a console and a run.log handler).
            root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess(["kdlab.run", *args], status, stdout.getvalue(), stderr.getvalue())


def cli_overrides(tmp_path: Path, batches: int = 3, teacher_store: Path | None = None) -> list[str]:
    """Like fast_overrides, but with Hydra's own run dir (paths.output_dir follows it)."""
    fast = fast_overrides(tmp_path, batches, teacher_store)
    return [*(o for o in fast if not o.startswith("paths.output_dir")), f"hydra.run.dir={tmp_path / 'run'}"]


def sweep_overrides(tmp_path: Path, batches: int = 3, teacher_store: Path | None = None) -> list[str]:
    """cli_overrides for a multirun: the caller sets hydra.sweep.dir, and each job has its own dir."""
    return [o for o in cli_overrides(tmp_path, batches, teacher_store) if not o.startswith("hydra.run.dir")]


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST files; CI installs them, so their absence there is a failure."""
    if not FASHION_MNIST.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST} is missing: CI must install dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def fortunes() -> Path:
    """Debian's fortunes, the default text corpus; CI installs it, so its absence there is a failure."""
    if not any(FORTUNES.glob("*.u8")):
        if os.environ.get("CI"):
            pytest.fail(f"{FORTUNES} is missing: CI must install Debian's fortunes package")
        pytest.skip("Debian's fortunes package is not installed (apt-get install fortunes)")
    return FORTUNES


def lm_overrides(tmp_path: Path, teacher_store: Path | None = None, batches: int = 2) -> list[str]:
    """task=lm on the real corpus with tiny models (a GPT-2 teacher of 2 blocks of width 32, a student of
    2 blocks of width 16), windows of 32 tokens, a few batches, one validation and test batch."""
    return [
        "task=lm",
        *fast_overrides(tmp_path, batches, teacher_store),
        "data.batch_size=8",
        "data.seq_len=32",
        "teacher.config={n_layer: 2, n_embd: 32, n_head: 2}",
        "student.config={n_layer: 2, n_embd: 16, n_head: 2}",
        "callbacks.samples.num_prompts=1",
        "callbacks.samples.prompt_tokens=8",
        "callbacks.samples.new_tokens=8",
    ]


# ---------------------------------------------------------------- runs shared across test files
@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory) -> Path:
    """A teacher store for the session's runs whose tests are not about the store: a teacher is
    trained once per spec (e.g. the default deepnn for `fast_overrides`' 3 batches) and reused.

    Tests of the store itself (trained, then reused; one per sweep) keep a store of their own.
    """
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def cli_wandb_job(tmp_path_factory, fashion_mnist, teacher_store) -> tuple[subprocess.CompletedProcess, Path]:
    """One CLI job as a user types it, two epochs with `logger=[csv,wandb]` (W&B offline), figures
    on: its process and run directory. tests/test_run.py reads its console output, and
    tests/test_wandb.py the W&B files it wrote."""
    tmp_path = tmp_path_factory.mktemp("cli_job")
    args = [
        *cli_overrides(tmp_path, teacher_store=teacher_store),
        "trainer.max_epochs=2",
        # The teacher of one epoch that other runs share (by default it follows trainer.max_epochs).
        "teacher_training.trainer.max_epochs=1",
        "logger=[csv,wandb]",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp_path / "run"


@pytest.fixture(scope="session")
def scheme_knowledge_sweep(tmp_path_factory, fashion_mnist) -> dict[tuple[str, str], Path]:
    """Every scheme with every kind of knowledge, one CLI multirun of 9 jobs with figures on:
    {(mode, knowledge): job directory}, for each job that finished. tests/test_run.py checks the
    jobs' results, tests/test_plots.py the figures each scheme wrote."""
    tmp_path = tmp_path_factory.mktemp("scheme_sweep")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *sweep_overrides(tmp_path, batches=2),
        f"hydra.sweep.dir={sweep}",
        "mode=offline,online,self",
        "knowledge=response,feature,relation",
    ]
    proc = run_cli(args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists()):
        overrides = dict(
            line[2:].strip().split("=", 1)
            for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
            if line.startswith("- ") and line[2:].split("=")[0] in ("mode", "knowledge")
        )
        jobs[overrides["mode"], overrides["knowledge"]] = job
    return jobs
