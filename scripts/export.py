"""Export a run's deployable student to ONNX, and check that ONNX Runtime gives PyTorch's logits.

    python scripts/export.py outputs/<date>/<time> --format onnx [--out student.onnx]

The student is rebuilt from the run's saved weights (`student_weights` in its metrics.json: the
tested student alone, `student.pt`) and the config the run was composed with (`.hydra/config.yaml`),
and written with `torch.onnx.export`: input `input` and output `logits`, with a dynamic batch axis,
the weights inside the file (default: RUN_DIR/student.onnx). ONNX Runtime then runs the file on a
batch of the run's test images, and on one image, and the script prints the largest absolute
difference from PyTorch's logits; above 1e-4 it fails. Where the test data cannot be read, random
inputs of the same shape stand in, and it says so.

Needs the `export` extras (onnx, onnxruntime, onnxscript): pip install -e ".[export]", which
scripts/setup.sh does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from kdlab.errors import KdlabError

FORMATS = ("onnx",)
# What `--format onnx` imports: the ONNX file format, the runtime that checks it, and the ONNX
# exporter of torch >= 2.5 (torch.onnx.export(..., dynamo=True), the default) is written in onnxscript.
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
TOLERANCE = 1e-4  # the largest absolute difference from PyTorch's logits that passes
ONNX_LIMIT_BYTES = 2**31  # protobuf's limit: larger weights go to a .data file beside the .onnx


def check_request(run_dir: Path, fmt: str) -> tuple[dict, Path, Path]:
    """The run's metrics.json, its config file and its student weights, or a KdlabError saying what
    is missing. Checked before torch is imported (seconds), so bad input is answered at once."""
    if fmt not in FORMATS:
        raise KdlabError(
            f"--format '{fmt}' is not a format scripts/export.py writes. Use --format onnx (the only "
            "one so far), which writes the student as an ONNX file and checks it with ONNX Runtime."
        )
    if not run_dir.is_dir():
        raise KdlabError(
            f"'{run_dir}' is not a directory. Pass the directory of a finished run: outputs/<date>/<time> "
            "(or multirun/<date>/<time>/<job>), the one a run prints as 'Run directory:'."
        )
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        # outputs/ or outputs/<date>: the runs below, up to <date>/<time>/<job>
        below = [
            p.parent for depth in range(1, 4) for p in sorted(run_dir.glob("*/" * depth + "metrics.json"))
        ]
        hint = (
            f" Runs below it: {', '.join(map(str, below[:3]))}{', ...' if len(below) > 3 else ''}."
            if below
            else ""
        )
        raise KdlabError(
            f"'{run_dir}' has no metrics.json, so it is not a finished run (a run writes it when it has "
            "tested its student). Pass the directory a run printed as 'Run directory:', or finish the "
            f"run first (ckpt_path=last resumes it).{hint}"
        )
    results = json.loads(metrics.read_text())
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise KdlabError(
            f"'{run_dir}' has no .hydra/config.yaml, which says how to rebuild its student (architecture, "
            "classes, input shape). Runs started with `python -m kdlab.run` write it; export one of those."
        )
    # The path the run wrote; the file beside metrics.json if the run directory has been moved since.
    written = Path(results.get("student_weights") or run_dir / "student.pt")
    weights = written if written.is_file() else run_dir / written.name
    if not weights.is_file():
        raise KdlabError(
            f"'{run_dir}' has no student weights: neither {written} (its metrics.json's student_weights) "
            f"nor {weights} exists. Export a run whose directory still holds its student.pt."
        )
    return results, config, weights


def check_packages(fmt: str) -> None:
    """A KdlabError naming what to install when the format's packages do not import."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise KdlabError(
            f"--format {fmt} needs the Python packages {', '.join(missing)}, which do not import in "
            f"{sys.executable}. Install kdlab's export extras: pip install -e '.[export]' (scripts/setup.sh "
            "installs them), then run this command again."
        )


def load_student(config: Path, weights: Path):
    """The run's deployable student in eval mode, built from its config with the saved weights."""
    import torch
    from omegaconf import OmegaConf

    from kdlab.build import build_model

    saved = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(saved, dict) and saved.get("deployed"):
        raise KdlabError(
            f"{weights} holds a student deployed with parts of its loss ({saved.get('architecture')}: "
            "SimKD's backbone, projector and the teacher's classifier), which scripts/export.py cannot "
            "rebuild from the config. Export a run of another knowledge, or export that model from "
            "Python with torch.onnx.export."
        )
    cfg = OmegaConf.load(config)
    return cfg, build_model(cfg.student, checkpoint=str(weights)).eval()


def check_inputs(cfg) -> tuple[object, str]:
    """A batch of the run's test images, or random inputs of their shape where the data cannot be read."""
    import torch

    from kdlab.build import instantiate

    try:
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("test")
        batch = next(iter(datamodule.test_dataloader()))["input"]
        return batch, f"{len(batch)} test images"
    except Exception as error:  # noqa: BLE001 (any data problem: the check still runs, on random inputs)
        data = cfg.data
        shape = (data.batch_size, data.in_channels, data.input_size, data.input_size)
        reason = str(error).strip().split("\n")[0]
        generator = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=generator), f"{shape[0]} random inputs (no test data: {reason})"


def export_onnx(model, example, out: Path) -> None:
    import torch

    from kdlab.efficiency import weights_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        out,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=weights_bytes(model) >= ONNX_LIMIT_BYTES,
        verbose=False,
    )


def onnx_difference(model, path: Path, inputs) -> float:
    """The largest absolute difference between ONNX Runtime's logits from `path` and the model's, on
    `inputs` and on its first input alone (the batch axis is dynamic)."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (inputs, inputs[:1]):
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(["logits"], {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export(run_dir: Path, fmt: str = "onnx", out: Path | None = None) -> tuple[Path, float]:
    """Write the run's student as `fmt` and check it: the file written and the largest difference."""
    _, config, weights = check_request(run_dir, fmt)
    check_packages(fmt)
    cfg, model = load_student(config, weights)
    inputs, source = check_inputs(cfg)
    out = out or run_dir / "student.onnx"
    export_onnx(model, inputs, out)
    difference = onnx_difference(model, out, inputs)
    verdict = "within" if difference <= TOLERANCE else "ABOVE"
    print(
        f"Wrote {out} ({cfg.student.name}, input {list(inputs.shape[1:])} with a dynamic batch axis).\n"
        f"ONNX Runtime vs PyTorch on {source} and on 1: max abs difference of the logits "
        f"{difference:.3g} ({verdict} {TOLERANCE:.0e})."
    )
    return out, difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (outputs/<date>/<time>)")
    parser.add_argument(
        "--format", default="onnx", help="the format to write: onnx (the default, and so far the only)"
    )
    parser.add_argument("--out", type=Path, help="the file to write (default: RUN_DIR/student.onnx)")
    args = parser.parse_args(argv)
    try:
        _, difference = export(args.run_dir, args.format, args.out)
    except KdlabError as error:
        parser.error(str(error))
    if difference > TOLERANCE:
        sys.exit(
            f"The exported model does not reproduce PyTorch's logits to {TOLERANCE:.0e}: do not deploy it."
        )


if __name__ == "__main__":
    main()
