"""End to end on a small subset of real Fashion-MNIST: in-process, and through the CLI.

The offline run, the CLI job and the every-scheme multirun are each made once and read by
several tests (the last two are shared with other files: tests/conftest.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdlab.errors import KdlabError
from kdlab.run import train
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, fashion_mnist):
    """One offline KD run (training the teacher into an empty store), and its config.

    Module-scoped: the tests below start their own runs from its store or its teacher file,
    each in its own output directory, and none of them changes what it wrote.
    """
    overrides = fast_overrides(tmp_path_factory.mktemp("offline"))
    return train(compose_config(overrides)), overrides


def test_offline_run_reports_both_models_and_writes_metrics(offline_run):
    results, _ = offline_run
    run_dir = Path(results["run_dir"])
    rows = {row["model"]: row for row in results["models"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["teacher"]["architecture"] == "deepnn" and rows["student"]["architecture"] == "lightnn"
    assert rows["teacher"]["params"] > rows["student"]["params"] > 0
    for row in rows.values():
        assert 0.0 <= row["test top-1"] <= 1.0
    assert 0.0 <= rows["student"]["agreement"] <= 1.0 and rows["student"]["KL to teacher"] >= 0
    for row in rows.values():  # what each costs to deploy (kdlab.efficiency)
        for column in ("FLOPs", "weights MB", "ms @ 1", "ms @ batch"):
            assert row[column] > 0, (row["model"], column)
    assert rows["teacher"]["FLOPs"] > rows["student"]["FLOPs"]
    assert results["teacher"]["source"] == "trained"
    assert results["optimized_metric"]["name"] == "val/student/top1"
    assert results["optimized_metric"]["value"] == results["metrics"]["val/student/top1"]
    for term in ("train/task_epoch", "train/kd_epoch", "train/loss_epoch"):
        assert term in results["metrics"], term
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["models"] == json.loads(json.dumps(results["models"]))
    efficiency = written["efficiency"]
    assert efficiency["input_shape"] == [1, 28, 28] and efficiency["batch_size"] == 32
    teacher, student = efficiency["models"]["teacher"], efficiency["models"]["student"]
    assert student["params"] == rows["student"]["params"] and student["flops"] == rows["student"]["FLOPs"]
    for key, ratio in efficiency["ratio"].items():
        assert ratio == pytest.approx(student[key] / teacher[key]), key
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/kd_epoch" in logged and "test/student/agreement" in logged


def test_second_run_reuses_the_stored_teacher(offline_run, tmp_path):
    first, overrides = offline_run
    second = train(
        compose_config([*overrides, f"paths.output_dir={tmp_path / 'again'}", "knowledge.kd.temperature=2"])
    )
    assert second["teacher"]["source"] == "store"
    assert second["teacher"]["path"] == first["teacher"]["path"]
    teacher_top1 = lambda r: next(m["test top-1"] for m in r["models"] if m["model"] == "teacher")  # noqa: E731
    assert teacher_top1(second) == teacher_top1(first)


def test_teacher_checkpoint_is_loaded_instead_of_training(offline_run, tmp_path):
    first, overrides = offline_run
    result = train(
        compose_config(
            [
                *overrides,
                f"paths.output_dir={tmp_path / 'ckpt'}",
                f"teacher.checkpoint={first['teacher']['path']}",
                f"paths.teacher_store={tmp_path / 'empty'}",
            ]
        )
    )
    assert result["teacher"]["source"] == "checkpoint"
    # No teacher was stored; the store holds at most the teacher-output cache's record that this
    # setting ran (outputs/<entry>.asked, see kdlab/teacher_cache/plan.py).
    stored = [p for p in (tmp_path / "empty").glob("*") if p.name != "outputs"]
    assert not stored


def test_baseline_mode_trains_the_student_alone(tmp_path, fashion_mnist):
    result = train(compose_config([*fast_overrides(tmp_path), "mode=baseline"]))
    assert [row["model"] for row in result["models"]] == ["student"]
    assert result["teacher"] is None and not (tmp_path / "teachers").exists()


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path, fashion_mnist):
    with pytest.raises(KdlabError, match="missing.pt"):
        train(compose_config([*fast_overrides(tmp_path), f"teacher.checkpoint={tmp_path / 'missing.pt'}"]))
    assert not (tmp_path / "teachers").exists()  # the error comes before any training


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path, fashion_mnist):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(KdlabError, match="bad.pt"):
        train(compose_config([*fast_overrides(tmp_path), f"teacher.checkpoint={bad}"]))


def test_wrong_architecture_checkpoint_names_the_keys(offline_run, tmp_path):
    first, overrides = offline_run
    with pytest.raises(KdlabError, match="features"):
        train(
            compose_config(
                [
                    *overrides,
                    f"paths.output_dir={tmp_path / 'wrong'}",  # not the shared run's directory
                    "model@teacher=resnet8",
                    f"teacher.checkpoint={first['teacher']['path']}",
                ]
            )
        )


def test_teacher_with_other_classes_is_refused(tmp_path, fashion_mnist):
    with pytest.raises(KdlabError, match="10 classes"):
        train(compose_config([*fast_overrides(tmp_path), "teacher.num_classes=5"]))


def test_unknown_optimized_metric_keeps_the_results(tmp_path, fashion_mnist):
    with pytest.raises(KdlabError, match="optimized_metric='val/nope'"):
        overrides = [*fast_overrides(tmp_path), "mode=baseline", "optimized_metric=val/nope", NO_PLOTS]
        train(compose_config(overrides))
    assert (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------- the CLI, as a user types it
def test_cli_job_prints_the_table(cli_wandb_job):
    proc, run_dir = cli_wandb_job
    assert "| teacher" in proc.stdout and "| student" in proc.stdout and "agreement" in proc.stdout
    assert "| FLOPs" in proc.stdout and "| ms @ 32 |" in proc.stdout
    assert "Student / teacher: " in proc.stdout and "x FLOPs" in proc.stdout
    assert f"Run directory: {run_dir}" in proc.stdout
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["run_dir"] == str(run_dir)


# --help, --cfg and bad input train nothing: they run in this process (tests/conftest.py:run_main).
def test_cli_help_lists_the_choices(tmp_path):
    proc = run_main(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for group in (
        "mode:",
        "knowledge:",
        "model:",
        "data:",
        "trainer:",
        "logger:",
        "callbacks:",
        "experiment:",
    ):
        assert group in proc.stdout, group
    assert "offline" in proc.stdout and "fashion_mnist" in proc.stdout


def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_main(["--cfg", "job", "knowledge.kd.temperature=2"], cwd=tmp_path)
    assert (
        proc.returncode == 0
        and "temperature: 2" in proc.stdout
        and "_target_: kdlab.schemes.Offline" in proc.stdout
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["model@student=resnet9000"], "Could not find 'model/resnet9000'"),
        (["mode=sideways"], "Available options in 'mode'"),
        (["knowledge.kd.temperature=0"], "temperature must be a finite number > 0"),
        (["knowledge.kd.tempreature=2"], "tempreature"),
    ],
)
def test_cli_bad_input_is_one_clear_error(args, message, tmp_path):
    proc = run_main([*cli_overrides(tmp_path), *args], cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "teachers").exists() or not list((tmp_path / "teachers").glob("*/teacher.pt"))


def test_every_scheme_runs_with_every_kind_of_knowledge_from_the_cli(scheme_knowledge_sweep):
    expected_rows = {
        "offline": {"teacher", "student"},
        "online": {"teacher", "student", "ensemble"},
        "self": {"student", "exit1", "exits_ensemble"},
    }
    assert len(scheme_knowledge_sweep) == 9
    for (mode, knowledge), job in scheme_knowledge_sweep.items():
        result = json.loads((job / "metrics.json").read_text())
        rows = {row["model"]: row for row in result["models"]}
        assert set(rows) == expected_rows[mode], (mode, knowledge)
        assert all(0 <= row["test top-1"] <= 1 for row in rows.values()), (mode, knowledge)
    # The three offline jobs distil from one teacher: one job trains it, the other two reuse it.
    teachers = [
        json.loads((job / "metrics.json").read_text())["teacher"]
        for (mode, _), job in scheme_knowledge_sweep.items()
        if mode == "offline"
    ]
    assert sorted(t["source"] for t in teachers) == ["store", "store", "trained"]
    assert len({t["path"] for t in teachers}) == 1
    # Each family's default is its usual method (the other methods: tests/test_knowledge_zoo.py).
    for family, term in {"response": "kd", "feature": "fitnet", "relation": "rkd"}.items():
        result = json.loads((scheme_knowledge_sweep["offline", family] / "metrics.json").read_text())
        assert result["knowledge"] == [term], family
        assert math.isfinite(result["metrics"][f"train/{term}_epoch"]), family
