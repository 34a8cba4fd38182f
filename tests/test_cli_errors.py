"""Bad command lines get one paragraph that names the key typed and what to type instead
(kdlab/cli.py, and the optimizer check in kdlab/build.py); good ones run as before.

Most of these fail or finish before any training, in this process (tests/conftest.py:run_main).
"""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

import kdlab.run
from kdlab.build import optimisation
from kdlab.cli import preflight
from kdlab.errors import KdlabError
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main, sweep_overrides


def check(argv: list[str]) -> list[str]:
    """The command line `python -m kdlab.run ARGV` hands to Hydra (or the KdlabError it raises)."""
    return preflight(["kdlab.run", *argv], kdlab.run.hydra_main, kdlab.run.CONFIG_DIR, kdlab.run.CONFIG_NAME)[
        1:
    ]


def assert_one_clear_error(proc, *expected: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "To append to your config" not in proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)


# ---------------------------------------------------------------- misspelled keys
@pytest.mark.parametrize(
    "args,typed,suggested",
    [
        (["knowledge.kd.temprature=2"], "no key `temprature`", "knowledge.kd.temperature=2"),
        (["trainer.max_epoch=3"], "no key `max_epoch`", "trainer.max_epochs=3"),
        (["optimizer.learning_rate=0.01"], "no key `learning_rate`", "optimizer.lr=0.01"),
        (["data.batch=64"], "no key `batch`", "data.batch_size=64"),
        # the node itself misspelled, and a second misspelling below it
        (["knowledg.kd.temperature=2"], "no top-level key `knowledg`", "knowledge.kd.temperature=2"),
        (["knowledg.kd.temprature=2"], "no top-level key `knowledg`", "knowledge.kd.temperature=2"),
        (["~knowledge.kd.temprature"], "nothing to delete", "~knowledge.kd.temperature"),
        # a sweep: the suggestion keeps the values; -c / --multirun spelled either way
        (["-m", "knowledge.kd.temprature=1,2,4"], "no key `temprature`", "knowledge.kd.temperature=1,2,4"),
        (["--multirun", "trainer.max_epoch=1,2"], "no key `max_epoch`", "trainer.max_epochs=1,2"),
        (["-c", "job", "trainer.max_epoch=3"], "no key `max_epoch`", "trainer.max_epochs=3"),
        # the teacher's own Trainer arguments are checked against trainer.*
        (["teacher_training.trainer.max_epoch=3"], "`max_epoch`", "teacher_training.trainer.max_epochs=3"),
    ],
)
def test_misspelled_key_names_the_key_and_the_nearest_one(args, typed, suggested, tmp_path):
    proc = run_main([*args, *cli_overrides(tmp_path)], cwd=tmp_path)  # Hydra's flags come first
    assert_one_clear_error(proc, args[-1], typed, suggested)
    assert not (tmp_path / "run").exists()  # failed before Hydra made the run directory


def test_every_misspelling_is_reported_with_the_node_keys(tmp_path):
    proc = run_main(["knowledge.kd.temprature=2", "data.batch=64"], cwd=tmp_path)
    assert_one_clear_error(proc, "knowledge.kd.temperature=2", "data.batch_size=64")
    keys = ", ".join(compose_config([]).knowledge.kd)  # as conf/knowledge/kd.yaml lists them today
    assert f"The keys of `knowledge.kd` are: {keys}." in proc.stderr


def test_an_argument_the_config_does_not_list_is_added_with_plus():
    with pytest.raises(KdlabError, match=r"torch.optim.Adam\) takes `betas`.*\+optimizer.betas=\[0.9,0.99\]"):
        check(["optimizer.betas=[0.9,0.99]"])


def test_what_is_no_misspelling_is_left_to_hydra(tmp_path):
    proc = run_main(["trainer.max_epochs.x=1"], cwd=tmp_path)  # a key below a value
    assert proc.returncode == 1 and "Could not override 'trainer.max_epochs.x'" in proc.stderr
    proc = run_main(["mode=sideways"], cwd=tmp_path)  # a group option: Hydra lists them
    assert proc.returncode == 1 and "Available options in 'mode'" in proc.stderr


# ---------------------------------------------------------------- command lines that must still work
def test_sweeps_are_composed_at_their_first_value():
    args = ["-m", "knowledge=kd,dkd", "knowledge.kd.temperature=range(1,3)", "mode=glob(off*)", "seed=1,2"]
    assert check(args) == args
    args = ["hparams_search=kd_optuna", "knowledge.kd.weight=interval(0.1,0.9)", "mode.task_weight=0.5"]
    assert check(args) == args


def test_flags_and_hydra_overrides_pass_through_unchanged():
    for args in (
        ["--help"],
        ["--hydra-help"],
        ["--info", "config"],
        ["--cfg", "job", "--resolve"],
        ["+new_key=1", "~knowledge.kd.task_weight", "hydra.job.chdir=false", "hydra/launcher=basic"],
        ["hydra.run.dir=/tmp/x", "hydra.verbose=true"],
    ):
        assert check(args) == args


def test_verbose_flag_becomes_an_override():
    assert check(["-v"]) == ["verbose=true"]
    assert check(["seed=1", "-v", "--cfg", "job"]) == ["seed=1", "verbose=true", "--cfg", "job"]
    assert check(["--cfg", "job", "--verbose"]) == ["verbose=true", "--cfg", "job"]


def test_cfg_job_with_new_key_and_verbose(tmp_path):
    proc = run_main(["--cfg", "job", "+new_key=1", "-v"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["new_key"] == 1 and job["verbose"] is True


def test_teacher_gets_any_trainer_and_optimizer_argument_without_plus(tmp_path):
    args = ["teacher_training.trainer.limit_train_batches=2", "teacher_training.optimizer.weight_decay=5e-4"]
    assert check(args) == [f"++{arg}" for arg in args]
    proc = run_main(["--cfg", "job", *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    teacher = OmegaConf.create(yaml.safe_load(proc.stdout))
    # What kdlab/teachers.py builds the teacher's Trainer and optimizer from.
    assert OmegaConf.merge(teacher.trainer, teacher.teacher_training.trainer).limit_train_batches == 2
    assert teacher.trainer.limit_train_batches != 2  # the student's Trainer is unchanged
    assert teacher.teacher_training.optimizer.weight_decay == 5e-4


def test_user_config_dir_is_searched_as_hydra_searches_it(tmp_path):
    (tmp_path / "conf" / "optimizer").mkdir(parents=True)
    (tmp_path / "conf" / "optimizer" / "mine.yaml").write_text(
        "_target_: torch.optim.SGD\n_partial_: true\nlr: 0.1\n"
    )
    for where in (
        ["--config-dir", str(tmp_path / "conf")],
        [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
    ):
        assert check([*where, "optimizer=mine", "optimizer.lr=0.5"])
        with pytest.raises(KdlabError, match=r"optimizer.lr=0.5\?"):
            check([*where, "optimizer=mine", "optimizer.lrr=0.5"])


def test_multirun_sweep_runs(tmp_path, fashion_mnist):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *sweep_overrides(tmp_path, batches=1),
        f"hydra.sweep.dir={sweep}",
        "mode=baseline",
        NO_PLOTS,
    ]
    proc = run_main([*args, "optimizer.lr=0.001,0.002"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").exists()) == ["0", "1"]


# ---------------------------------------------------------------- optimizer settings torch refuses
def test_negative_learning_rate_is_one_clear_error_before_any_teacher_trains(tmp_path, fashion_mnist):
    proc = run_main([*cli_overrides(tmp_path), "optimizer.lr=-1"], cwd=tmp_path)
    assert_one_clear_error(proc, "optimizer.lr=-1", "positive learning rate", "optimizer.lr=1e-3")
    assert not list((tmp_path / "teachers").glob("*/teacher.pt"))
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["optimizer=sgd", "optimizer.momentum=-0.5"],
            "optimizer.momentum=-0.5 is refused by torch.optim.SGD",
        ),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is refused"),
        (["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov=true"),
        (["+optimizer.momentm=0.9"], "it takes no `momentm`"),
    ],
)
def test_optimizer_settings_torch_refuses_name_the_key(args, message, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), *args])
    with pytest.raises(KdlabError, match=message.replace(".", r"\.")):
        optimisation(cfg)


def test_the_teachers_own_optimizer_setting_is_named(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "++teacher_training.optimizer.lr=-2"])
    assert optimisation(cfg)["optimizer"] is not None  # the student's is fine
    with pytest.raises(KdlabError, match=r"teacher_training\.optimizer\.lr=-2"):
        optimisation(cfg, cfg.teacher_training.optimizer)


def test_a_job_records_the_rewritten_override(tmp_path):
    """What a job records (.hydra/overrides.yaml, the resume command) composes the same config again."""
    proc = run_main(["--cfg", "hydra", "teacher_training.trainer.limit_train_batches=2"], cwd=tmp_path)
    assert proc.returncode == 0
    overrides = yaml.safe_load(proc.stdout)["hydra"]["overrides"]["task"]
    assert overrides == ["++teacher_training.trainer.limit_train_batches=2"]
