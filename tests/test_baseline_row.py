"""The results table's baseline row: the student alone, trained once in the store and reused.

Checked from the outside: the stored baseline's weights are exactly those of a `mode=baseline` run
with the same seed and settings, its reported top-1 is recounted from those weights with plain
PyTorch, a second run reuses it, another seed trains another, and the table and gain line show it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.run import train
from tests.conftest import NO_PLOTS, compose_config, fast_overrides, run_main
from tests.test_metrics_recomputed import counted, load, loader_batches


def _overrides(tmp_path: Path, store: Path, *extra: str) -> list[str]:
    return [
        *fast_overrides(tmp_path, batches=4, teacher_store=store),
        "data.batch_size=64",
        "trainer.limit_test_batches=3",
        NO_PLOTS,
        *extra,
    ]


@pytest.fixture(scope="module")
def with_baseline(tmp_path_factory, fashion_mnist):
    """An offline run with the baseline row, and the same student trained by mode=baseline."""
    root = tmp_path_factory.mktemp("baseline_row")
    store = root / "store"
    cfg = compose_config(_overrides(root / "kd", store, "baseline_row=true", "seed=3"))
    alone_cfg = compose_config(_overrides(root / "alone", store, "mode=baseline", "seed=3"))
    return cfg, train(cfg), alone_cfg, train(alone_cfg), store


def test_stored_baseline_is_the_mode_baseline_run_of_that_seed(with_baseline):
    cfg, results, _, alone, _ = with_baseline
    assert results["baseline"]["source"] == "trained"
    stored = torch.load(results["baseline"]["path"], map_location="cpu", weights_only=False)["state_dict"]
    trained = torch.load(alone["student_weights"], map_location="cpu", weights_only=False)["state_dict"]
    assert stored.keys() == trained.keys()
    for name, tensor in stored.items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    assert results["metrics"]["test/baseline/top1"] == pytest.approx(alone["metrics"]["test/student/top1"])


def test_baseline_top1_is_recounted_from_its_stored_weights(with_baseline):
    cfg, results, *_ = with_baseline
    model = load(cfg.student.name, results["baseline"]["path"], cfg)
    recount = counted(model, None, loader_batches(cfg, "test", 3))["student"]
    assert results["metrics"]["test/baseline/top1"] == pytest.approx(recount, abs=1e-6)


def test_table_row_and_metrics_json(with_baseline):
    cfg, results, *_ = with_baseline
    rows = {row["model"]: row for row in results["models"]}
    assert list(rows) == ["teacher", "baseline", "student"]
    assert rows["baseline"]["architecture"] == cfg.student.name
    assert rows["baseline"]["params"] == rows["student"]["params"]
    written = json.loads(Path(results["run_dir"], "metrics.json").read_text())
    assert written["baseline"]["path"] == results["baseline"]["path"]
    assert written["wall_time_s"] > 0


def test_a_later_run_reuses_it_and_another_seed_trains_its_own(with_baseline, tmp_path):
    cfg, results, _, _, store = with_baseline
    again = train(
        compose_config(_overrides(tmp_path / "again", store, "baseline_row=true", "seed=3", "knowledge=dist"))
    )
    assert again["baseline"] == {**results["baseline"], "source": "store"}
    other = train(compose_config(_overrides(tmp_path / "other", store, "baseline_row=true", "seed=4")))
    assert other["baseline"]["source"] == "trained"
    assert other["baseline"]["key"] != results["baseline"]["key"]


def test_console_prints_the_row_and_the_gain(with_baseline, tmp_path):
    *_, store = with_baseline
    args = [
        o
        for o in _overrides(tmp_path, store, "baseline_row=true", "seed=3")
        if not o.startswith("paths.output")
    ]
    done = run_main([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| baseline | lightnn" in done.stdout.replace("  ", " ").replace("  ", " ")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    gain = 100 * (metrics["test/student/top1"] - metrics["test/baseline/top1"])
    assert f"Gain over the student alone (same data, budget and seed): {gain:+.2f} points" in done.stdout


@pytest.mark.parametrize("mode", ["baseline", "online"])
def test_no_row_where_there_is_no_single_distilled_student(mode, tmp_path, fashion_mnist):
    results = train(
        compose_config(_overrides(tmp_path, tmp_path / "store", "baseline_row=true", f"mode={mode}"))
    )
    assert results["baseline"] is None
    assert "baseline" not in {row["model"] for row in results["models"]}
