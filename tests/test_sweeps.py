"""Sweeps from the CLI: an Optuna study in SQLite that resumes; multiruns that survive a failing job,
share one teacher and log one W&B run per job."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from kdlab.sweeps import (
    BASIC_SWEEPER,
    ResumingTPESampler,
    SweepSummary,
    override_dict,
    read_overrides,
    run_or_record_failure,
)
from tests.conftest import CONF, ROOT, run_cli, run_main, sweep_overrides

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
SEARCHED = ("knowledge.kd.temperature", "knowledge.kd.weight", "mode.task_weight")


@pytest.fixture(scope="module")
def optuna():
    """Optuna, from the `sweep` extra; scripts/setup.sh installs it, so in CI its absence is a failure."""
    try:
        import optuna
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("optuna is missing: scripts/setup.sh must install the `sweep` extra")
        pytest.skip('the `sweep` extra is not installed (pip install -e ".[sweep]")')
    return optuna


# The Optuna launches run in this process (tests/conftest.py:run_main): what is tested is the
# study in its SQLite file, which a second launch finds just as a second process does.
def test_optuna_study_lives_in_sqlite_and_resumes(tmp_path, fashion_mnist, optuna, teacher_store):
    db = tmp_path / "study.db"

    def study_run(name):
        # One trial per launch: the second launch's trial is what shows the resume.
        sweep = tmp_path / name
        args = [
            "hparams_search=kd_optuna",
            "hydra.sweeper.n_trials=1",
            *sweep_overrides(tmp_path, batches=2, teacher_store=teacher_store),
        ]
        proc = run_main([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"KDLAB_OPTUNA_DB": str(db)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [sweep / "0"]

    jobs = study_run("first")  # no -m: the search config makes it a multirun
    jobs += study_run("again")  # the same command: the stored study resumes
    summaries = optuna.study.get_all_study_summaries(storage=f"sqlite:///{db}")
    assert [s.study_name for s in summaries] == ["kd_optuna"]
    trials = optuna.load_study(study_name="kd_optuna", storage=f"sqlite:///{db}").trials
    assert [t.number for t in trials] == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for trial, job in zip(trials, jobs, strict=True):
        results = json.loads((job / "metrics.json").read_text())
        assert trial.value == results["metrics"]["val/student/top1"] == results["optimized_metric"]["value"]
        overrides = override_dict(read_overrides(job))  # the job ran with the values Optuna suggested
        assert {key: float(overrides[key]) for key in SEARCHED} == trial.params
        assert trial.params["knowledge.kd.temperature"] in (1, 2, 4, 8)
    # The resumed run explored a new point instead of repeating the first run's.
    assert trials[1].params != trials[0].params


def test_optuna_sees_a_failing_trial(tmp_path, optuna):
    """Under Optuna a job's error is not hidden: its trial is FAIL; past max_failure_rate the sweep stops."""
    db = tmp_path / "study.db"
    args = ["hparams_search=kd_optuna", "hydra.sweeper.n_trials=1", "knowledge.kd.temperature=0"]
    proc = run_main(
        [*args, *sweep_overrides(tmp_path, batches=2), f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env={"KDLAB_OPTUNA_DB": str(db)},
    )
    assert proc.returncode != 0
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr
    trials = optuna.load_study(study_name="kd_optuna", storage=f"sqlite:///{db}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
    assert json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())["error"] == "KdlabError"


def test_resumed_sampler_continues_with_new_points(optuna):
    """A fresh study gets exactly TPESampler(seed); a second process on the same study does not repeat it."""
    from optuna.distributions import UniformDistribution

    def suggest(study, n):
        for _ in range(n):
            trial = study.ask()
            study.tell(trial, trial._suggest("x", UniformDistribution(0, 1)))

    storage = optuna.storages.InMemoryStorage()
    fresh = optuna.create_study(study_name="s", storage=storage, sampler=ResumingTPESampler(seed=7))
    suggest(fresh, 3)
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7))
    suggest(plain, 3)
    assert [t.params for t in fresh.trials] == [t.params for t in plain.trials]
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=ResumingTPESampler(seed=7))
    suggest(resumed, 3)
    first, second = ([t.params["x"] for t in resumed.trials[i : i + 3]] for i in (0, 3))
    assert len(resumed.trials) == 6 and set(first).isdisjoint(second)


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, fashion_mnist):
    """A CLI multirun of three offline KD jobs whose middle one has bad input, logging to CSV and
    W&B (offline): its process and sweep directory. One multirun shows both the failure handling
    and what the jobs of a sweep share (the teacher) and keep apart (their W&B runs)."""
    tmp_path = tmp_path_factory.mktemp("failing_sweep")
    sweep = tmp_path / "temperature-sweep"  # a name to find as the W&B runs' group
    args = ["-m", *sweep_overrides(tmp_path, batches=2), f"hydra.sweep.dir={sweep}", "logger=[csv,wandb]"]
    proc = run_cli([*args, "knowledge.kd.temperature=2,0,4"], cwd=tmp_path)
    return proc, sweep


def test_failing_job_is_reported_and_the_other_jobs_are_kept(failing_sweep):
    proc, sweep = failing_sweep
    # Every job ran, then the exit status says that one failed, so scripts and CI notice.
    assert proc.returncode == 1, proc.stderr[-3000:]
    for good in (0, 2):
        assert json.loads((sweep / str(good) / "metrics.json").read_text())["models"]
        assert not (sweep / str(good) / "failed.json").exists()
    assert not (sweep / "1" / "metrics.json").exists()
    failure = json.loads((sweep / "1" / "failed.json").read_text())
    assert "knowledge.kd.temperature=0" in failure["overrides"]
    assert failure["error"] == "KdlabError" and "temperature" in failure["message"]
    assert "Sweep finished: 3 jobs, 2 succeeded, 1 failed." in proc.stdout
    assert (
        "FAILED job 1: knowledge.kd.temperature=0\n    KdlabError: knowledge.kd.temperature=0" in proc.stdout
    )
    assert f"Results: {sweep}/<job>/metrics.json" in proc.stdout
    assert "1 of 3 jobs failed" in proc.stderr and "Traceback" not in proc.stderr

    # The table the summary points to: the two finished jobs, one row each, and the failed
    # configuration as a row of its own (n = 0, the error as its finding), named as the others are
    # although its command line did not choose knowledge=kd.
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep)], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["method"], r["knowledge.kd.temperature"], r["n"]) for r in rows] == [
        ("offline kd", "2", "1"),
        ("offline kd", "4", "1"),
        ("offline kd", "0", "0"),
    ]
    assert rows[2]["finding"].startswith("failed (KdlabError): knowledge.kd.temperature=0")
    for row, job in zip(rows[:2], (0, 2), strict=True):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())["metrics"]
        assert float(row["student top-1 mean"]) == metrics["test/student/top1"]
    assert f"Failed: {sweep / '1'} (see its failed.json)" in table.stderr


def test_sweep_jobs_share_one_teacher_and_each_has_its_own_wandb_run(failing_sweep):
    proc, sweep = failing_sweep
    assert proc.returncode == 1, proc.stderr[-3000:]  # job 1's bad input; see the test above
    jobs = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in (0, 2)]
    assert [job["teacher"]["source"] for job in jobs] == ["trained", "store"]
    assert len(list((sweep.parent / "teachers").glob("*/teacher.pt"))) == 1
    runs = [list((sweep / str(n) / "wandb").glob("offline-run-*/run-*.wandb")) for n in (0, 2)]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name != runs[1][0].name
    for r in runs:  # grouped by the sweep, tagged by mode and knowledge
        data = r[0].read_bytes()
        assert sweep.name.encode() in data and b"mode:offline" in data and b"knowledge:kd" in data


def test_summary_names_failed_jobs_by_what_sets_them_apart(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for num, (temperature, outcome) in enumerate([(1, "metrics"), (2, None), (3, "failed"), (4, "metrics")]):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        overrides = f"- data.batch_size=32\n- knowledge.kd.temperature={temperature}\n"
        (job / ".hydra" / "overrides.yaml").write_text(overrides)
        if outcome == "metrics":
            (job / "metrics.json").write_text("{}")
        elif outcome == "failed":
            failure = {
                "overrides": [],
                "error": "OutOfMemoryError",
                "message": "CUDA out of memory.\nTried 2 GiB",
            }
            (job / "failed.json").write_text(json.dumps(failure))
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"_target_": BASIC_SWEEPER}}}
    )
    with pytest.raises(SystemExit, match="2 of 4 jobs failed"):
        SweepSummary().on_multirun_end(config=config)
    assert capsys.readouterr().out.splitlines() == [
        "Sweep finished: 4 jobs, 2 succeeded, 2 failed.",
        "  FAILED job 1: knowledge.kd.temperature=2",
        f"    no metrics.json and no failed.json: the job was interrupted ({sweep / '1' / 'run.log'})",
        "  FAILED job 2: knowledge.kd.temperature=3",
        f"    OutOfMemoryError: CUDA out of memory. ({sweep / '2' / 'failed.json'})",
        f"Results: {sweep}/<job>/metrics.json",
        f"Table over seeds: python scripts/summarize.py {sweep}",
    ]
    # Under a sweeper with its own failure budget (Optuna), the summary is printed and the exit is 0.
    config.hydra.sweeper._target_ = OPTUNA_SWEEPER
    SweepSummary().on_multirun_end(config=config)
    assert "2 failed" in capsys.readouterr().out


@pytest.mark.parametrize("sweeper", [BASIC_SWEEPER, OPTUNA_SWEEPER])
def test_a_crash_is_recorded_and_only_the_basic_sweeper_is_spared_it(sweeper, tmp_path, caplog, monkeypatch):
    """Any exception, not just bad input: logged with its traceback, written to failed.json."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["seed=3"], return_hydra_config=True)
    cfg.hydra.mode, cfg.hydra.runtime.output_dir, cfg.hydra.job.num = RunMode.MULTIRUN, str(tmp_path), 7
    cfg.hydra.sweeper._target_ = sweeper
    # Set for this test only: monkeypatch puts back the "no Hydra" state the later tests expect.
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)

    def crash():
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    if sweeper == BASIC_SWEEPER:
        assert run_or_record_failure(crash, ["kd"]) is None
        assert "Job 7 failed" in caplog.text and "Traceback" in caplog.text
    else:  # Optuna counts it against max_failure_rate
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            run_or_record_failure(crash, ["kd"])
    failure = json.loads((tmp_path / "failed.json").read_text())
    assert failure["overrides"] == ["seed=3"] and failure["error"] == "RuntimeError"
    assert (failure["mode"], failure["knowledge"]) == ("offline", ["kd"])  # what the job composed
    assert failure["message"].startswith("CUDA out of memory.") and "in crash" in failure["traceback"]
    assert run_or_record_failure(lambda: 0.5, ["kd"]) == 0.5 and not (tmp_path / "failed.json").exists()
