"""scripts/fashion_mnist_table.sh, run for real on a tiny budget: every sweep, the table and its chart.

The README's command runs 28 methods and 8 scheme rows over 3 seeds for about an hour; here METHODS=kd,
SEEDS=1,2 and a few batches per run keep every sweep of the script (baseline, offline, online, BYOT,
PS-KD, CS-KD, Born-Again generations 1 and 2, Tf-KD's two variants), the summary it writes and the
document it composes. One row's mean and gain are recomputed from its runs' metrics.json.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "fashion_mnist_table.sh"
TINY = [
    "trainer.limit_train_batches=2",
    "teacher_training.trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=32",
    "teacher_cache.enabled=false",
    "callbacks.plots=null",
]


def test_the_table_command_runs_every_sweep_and_writes_its_document(tmp_path, fashion_mnist):
    out, doc = tmp_path / "out", tmp_path / "docs" / "fashion_mnist"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "offline",
        "SEEDS": "1,2",
        "METHODS": "kd",
        "DOC": str(doc),
        "KDLAB_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), *TINY], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {(row["method"], row["n"]) for row in rows} >= {
        ("baseline (student alone)", "2"),
        ("offline kd", "2"),
        ("online dml", "2"),
        ("pskd dml", "2"),
        ("cskd", "2"),
    }
    assert len(rows) == 10  # + BYOT, Born-Again generations 1 and 2, Tf-KD reg and self
    assert all(float(row["wall time s"]) > 0 for row in rows)

    # The offline KD row, recomputed from its runs' metrics.json.
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs" / "offline").glob("*/metrics.json"))]
    alone = [json.loads(p.read_text()) for p in sorted((out / "runs" / "baseline").glob("*/metrics.json"))]
    top1 = [run["metrics"]["test/student/top1"] for run in runs]
    base = [run["metrics"]["test/student/top1"] for run in alone]
    kd = next(row for row in rows if row["method"] == "offline kd")
    assert float(kd["student top-1 mean"]) == statistics.mean(top1)
    assert abs(float(kd["gain"]) - (statistics.mean(top1) - statistics.mean(base))) < 1e-9

    text = (doc.parent / "fashion_mnist.md").read_text()
    assert text.startswith("# Fashion-MNIST: every kdlab method and scheme")
    assert "trainer.max_epochs=2" in text and "seeds 1,2" in text
    assert (out / "summary.md").read_text().strip() in text
    assert (doc.parent / "fashion_mnist.png").read_bytes()[:4] == b"\x89PNG"
