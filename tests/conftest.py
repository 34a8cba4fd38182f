"""Shared test helpers: compose kdlab's real config with small, fast overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fast_overrides(tmp_path: Path, batches: int = 3) -> list[str]:
    """A run of a few batches of real Fashion-MNIST, writing only under tmp_path."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.teacher_store={tmp_path / 'teachers'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.batch_size=32",
    ]


def compose_config(overrides: list[str]) -> DictConfig:
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


def cli_overrides(tmp_path: Path, batches: int = 3) -> list[str]:
    """Like fast_overrides, but with Hydra's own run dir (paths.output_dir follows it)."""
    keep = [o for o in fast_overrides(tmp_path, batches) if not o.startswith("paths.output_dir")]
    return [*keep, f"hydra.run.dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST files; CI installs them, so their absence there is a failure."""
    if not FASHION_MNIST.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST} is missing: CI must install dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST
