"""kdlab as a built wheel, installed without the repository (`pip install .`, issue 10): the wheel
carries every module and every config of conf/ (as the package kdlab.conf), and its `kdlab`
command lists the config groups and runs a job from a directory outside any checkout.

One test, since the build, the environment and the job's imports are the cost (seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import CONF, NO_PLOTS, ROOT, cli_overrides

# What the build reads (pyproject.toml names them). Building from a copy of just these keeps the
# shared tree's build/ out of it: setuptools reuses build/lib, where a deleted config would linger.
BUILD_INPUTS = ["pyproject.toml", "README.md", "kdlab", "conf"]


def _run(args: list, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels]
    _run([*pip_wheel, "--disable-pip-version-check", "--quiet", source], cwd=tmp_path)
    (wheel,) = wheels.glob("kdlab-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path) -> Path:
    """A virtual environment of its own for kdlab, that borrows torch and the other dependencies
    (and pip) from this interpreter's site-packages through a .pth file, instead of installing them."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    borrowed = [*site.getsitepackages(), site.getusersitepackages()]
    # .pth entries come after the venv's own site-packages, so the wheel's kdlab shadows any other.
    Path(purelib.stdout.strip(), "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    return venv


def test_wheel_carries_the_configs_and_runs_a_job_outside_the_repo(tmp_path, fashion_mnist):
    wheel = _build_wheel(tmp_path)
    files = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"kdlab/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert {n for n in files if n.startswith("kdlab/conf/")} == {*configs, "kdlab/conf/__init__.py"}
    # A subpackage missing from pyproject.toml's package list would be left out of the wheel.
    modules = {f"kdlab/{p.relative_to(ROOT / 'kdlab').as_posix()}" for p in (ROOT / "kdlab").rglob("*.py")}
    assert modules <= files, sorted(modules - files)

    venv = _fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel]
    _run([*install, "--disable-pip-version-check", "--quiet"], cwd=tmp_path)

    # Outside the repository, and without PYTHONPATH, nothing but the installed wheel provides kdlab.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_MODE": "offline"}
    where = _run([python, "-c", "import kdlab.conf; print(kdlab.conf.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    # The console script; its help lists every config group, nested ones too (experiment/cifar100).
    # Groups under hydra/ are Hydra's own, listed by --hydra-help; the file list above covers them.
    help_text = _run([venv / "bin" / "kdlab", "--help"], cwd=elsewhere, env=env).stdout
    groups = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}
    for group in sorted(g for g in groups if g.split("/")[0] != "hydra"):
        line = next((ln for ln in help_text.splitlines() if ln.startswith(f"{group}: ")), "")
        options = {p.stem for p in (CONF / group).glob("*.yaml")}
        assert options <= set(line.removeprefix(f"{group}: ").split(", ")), (group, help_text)

    # The default job (offline KD: a teacher trained, then the student), a couple of batches.
    args = [*cli_overrides(tmp_path, batches=2), NO_PLOTS]
    _run([python, "-m", "kdlab.run", *args], cwd=elsewhere, env=env)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mode"] == "offline" and metrics["run_dir"] == str(tmp_path / "run")
