"""scripts/export.py: a real run's student written as ONNX, its logits checked here again with ONNX
Runtime against the student rebuilt from the run's weights; and bad input, answered in one paragraph."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdlab.build import instantiate
from kdlab.models import create_model
from tests.conftest import NO_PLOTS, ROOT, cli_overrides, run_main

SCRIPT = ROOT / "scripts" / "export.py"


def export(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_mnist):
    """A tiny real run of the default student (alone: the student is what is exported), as the CLI
    makes it, with its .hydra/config.yaml."""
    tmp_path = tmp_path_factory.mktemp("export")
    proc = run_main([*cli_overrides(tmp_path), "mode=baseline", NO_PLOTS], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


def onnx_packages():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        # CI installs the export extra, so there its absence is a failure, as for the data.
        if os.environ.get("CI"):
            pytest.fail("onnx or onnxruntime is missing: scripts/setup.sh must install kdlab[export]")
        pytest.skip("onnx and onnxruntime are not installed (pip install -e '.[export]')")
    return onnx, onnxruntime


def test_the_exported_student_gives_pytorchs_logits_in_onnx_runtime(run_dir, tmp_path):
    onnx, onnxruntime = onnx_packages()

    out = tmp_path / "deploy" / "lightnn.onnx"
    proc = export(run_dir, "--format", "onnx", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and f"Wrote {out}" in proc.stdout
    assert "max abs difference of the logits" in proc.stdout and "test images" in proc.stdout

    # Recomputed here: the student from the run's own weights, on a batch of its test images.
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    weights = json.loads((run_dir / "metrics.json").read_text())["student_weights"]
    data = cfg.data
    student = create_model(
        cfg.student.name, data.num_classes, data.in_channels, data.input_size, checkpoint=weights
    ).eval()
    datamodule = instantiate(data)
    datamodule.prepare_data()
    datamodule.setup("test")
    x = next(iter(datamodule.test_dataloader()))["input"]
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (x, x[:5]):
        with torch.inference_mode():
            expected = student(batch).numpy()
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        assert got.shape == (len(batch), data.num_classes)
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["no/such/run"], "'no/such/run' is not a directory. Pass the directory of a finished run"),
        (["{run_dir}", "--format", "tflite"], "--format 'tflite' is not a format scripts/export.py writes"),
        (["{parent}"], "has no metrics.json, so it is not a finished run"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, run_dir):
    proc = export(*(a.format(run_dir=run_dir, parent=run_dir.parent) for a in args))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if "metrics.json" in message:
        assert f"Runs below it: {run_dir}." in proc.stderr


def test_missing_onnxruntime_says_what_to_install(run_dir, tmp_path):
    # A package that fails to import, as onnxruntime does where it is not installed.
    package = tmp_path / "onnxruntime"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    proc = export(run_dir, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--format onnx needs the Python packages onnxruntime, which do not import" in proc.stderr
    assert "pip install -e '.[export]'" in proc.stderr
