"""Every kdlab command in README.md's ```bash blocks, run as a test, so the README cannot drift from
what kdlab accepts.

README.md is parsed when the tests are collected, so a command added to (or changed in) the README is
tested without touching this file; each command is its own test, named by the command's text. A
command is run in one of three ways:

- **as is**, when it trains nothing (`--help`, `--cfg job`);
- **composed only** (`--cfg job` appended, once per job of a sweep), when training it here is
  impossible or long: GPUs or several processes, data other than Fashion-MNIST and the fortunes corpus
  (the only data on this machine), an Optuna study, a cluster launcher, a placeholder path kdlab cannot
  stand in for, or a sweep of more than MAX_SWEEP_JOBS jobs;
- **a tiny real run** otherwise: the README's arguments with a small budget appended (one epoch of a
  few batches, one val/test batch, every path under tmp_path, the session's shared teacher store), as
  tests/conftest.py's `cli_overrides` has it. A `teacher.checkpoint=path/to/...` placeholder gets a
  real teacher file of the command's own teacher.

The check is exit status 0, plus: for a run, metrics.json with every model's test top-1; for a
composition, that the composed config shows each of the README's overrides (group choices and
values) that the budget does not replace.

The README's first two commands (`scripts/setup.sh && ...`) install kdlab, and are not run here: CI
(`.ci/run`) runs the second one as it is, setup.sh included, and tests/test_package.py checks what an
install yields (the package, and its `kdlab` command running a job). What they run is covered too:
the default job by tests/test_run.py's CLI job, the test command by this suite itself.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from kdlab.models.timm_models import register_choices
from tests.conftest import CONF, ROOT, cli_overrides, compose_config, run_main, sweep_overrides

README = ROOT / "README.md"
# A README sweep of more jobs than this is composed per job instead of run: each tiny job costs a
# few seconds on 2 cores, and what a sweep adds over one job (the launcher, the shared teacher,
# failure handling) is tested by tests/test_sweeps.py.
MAX_SWEEP_JOBS = 4
# Hydra flags that take a value, and the ones that ask Hydra for information instead of a run.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}
VALUE_FLAGS |= {"--config-dir", "-cd", "--experimental-rerun"}
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
# Placeholders a README writes for the user's own path.
PLACEHOLDER = re.compile(r"(^|/)path/to/|<[^>]*>")
# Added to a tiny run's budget when its config has the figures and the sanity check: figures cost
# about a second per run (tests/test_plots.py checks them), and the sanity check a val batch per fit.
TRIMMINGS = {"~callbacks.plots": "callbacks.plots", "trainer.num_sanity_val_steps=0": "trainer"}
# The data this machine (and CI) has: Fashion-MNIST and the fortunes corpus (task=lm). Others would need a
# download or a mounted path.
LOCAL_DATA = ("kdlab.data.FashionMNISTDataModule", "kdlab.data.TextCorpusDataModule")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ------------------------------------------------------------------------- reading the README
@dataclass(frozen=True)
class Command:
    """One kdlab command line of the README: its text (without a trailing comment), the
    environment variables it sets, and kdlab's arguments."""

    text: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()

    @property
    def multirun(self) -> bool:
        return any(arg in MULTIRUN_FLAGS for arg in self.args)

    @property
    def info(self) -> bool:
        """Asks Hydra for help or a composed config: trains nothing, so it runs as it is."""
        return any(arg in INFO_FLAGS for arg in self.args)

    @property
    def overrides(self) -> list[str]:
        """The arguments without Hydra's flags (and their values)."""
        overrides, skip = [], False
        for arg in self.args:
            if skip:
                skip = False
            elif arg in VALUE_FLAGS:
                skip = True
            elif not arg.startswith("-"):
                overrides.append(arg)
        return overrides


def kdlab_arguments(tokens: list[str]) -> list[str] | None:
    """kdlab's arguments if `tokens` run kdlab (`kdlab`, or any python `-m kdlab.run`), else None."""
    if tokens and tokens[0] == "kdlab":
        return tokens[1:]
    python = re.fullmatch(r"(.*/)?python[0-9.]*", tokens[0]) if tokens else None
    if python and tokens[1:3] == ["-m", "kdlab.run"]:
        return tokens[3:]
    return None


def readme_commands(markdown: str) -> list[Command]:
    """Every kdlab command line in the ```bash blocks of `markdown`, in order."""
    commands = []
    for block in re.findall(r"^```bash[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            text = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())  # a comment starts at " #"
            tokens = shlex.split(text)
            # The install commands: CI and tests/test_package.py cover them (see the module docstring).
            if not tokens or tokens[0] == "scripts/setup.sh":
                continue
            # `a && b`: each part is a command of its own.
            parts = [list(group) for is_and, group in itertools.groupby(tokens, "&&".__eq__) if not is_and]
            for part in parts:
                env = {}
                while part and ENV_ASSIGNMENT.match(part[0]):
                    name, value = part.pop(0).split("=", 1)
                    env[name] = value
                args = kdlab_arguments(part)
                if args is not None:
                    commands.append(Command(text if len(parts) == 1 else " ".join(part), env, tuple(args)))
    return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_parser_finds_every_form_of_command():
    markdown = "\n".join(
        [
            "```bash",
            "scripts/setup.sh && .venv/bin/python -m kdlab.run",
            "python -m kdlab.run mode=baseline      # a comment",
            "WANDB_MODE=offline A=1 .venv/bin/python -m kdlab.run logger=wandb",
            "kdlab -m seed=1,2 \\",
            "  knowledge=kd",
            ".venv/bin/python scripts/bench.py --allocator",
            "```",
            "```",
            "python -m kdlab.run not=bash",
            "```",
        ]
    )
    assert readme_commands(markdown) == [
        Command("python -m kdlab.run mode=baseline", {}, ("mode=baseline",)),
        Command(
            "WANDB_MODE=offline A=1 .venv/bin/python -m kdlab.run logger=wandb",
            {"WANDB_MODE": "offline", "A": "1"},
            ("logger=wandb",),
        ),
        Command("kdlab -m seed=1,2 knowledge=kd", {}, ("-m", "seed=1,2", "knowledge=kd")),
    ]
    assert Command("", args=("-m", "--cfg", "job", "a=1", "-cn", "run")).overrides == ["a=1"]


def test_the_readme_has_kdlab_commands():
    assert COMMANDS, "no kdlab command found in README.md's ```bash blocks: has the parser broken?"


# ----------------------------------------------------------------------------- the overrides
def parse(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(overrides)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a `-m` command, each as its own overrides (a command without sweeps: one job),
    expanded as Hydra's basic sweeper does."""
    parsed = parse(overrides)
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def composed(overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The job config of `overrides` and Hydra's choice of option in each config group."""
    register_choices(overrides)  # `model@student=timm/<name>`, as the command line does (kdlab/cli.py)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return cfg, choices


def is_placeholder(override: Override) -> bool:
    return isinstance(override.value(), str) and PLACEHOLDER.search(override.value()) is not None


def compose_only_reason(cfg: Any, choices: dict, overrides: list[str], jobs: int) -> str | None:
    """Why a command is composed rather than run here, or None when a tiny run is cheap; `cfg` and
    `choices` are its (first job's) composition."""
    if jobs > MAX_SWEEP_JOBS:
        return f"a sweep of {jobs} jobs (more than {MAX_SWEEP_JOBS})"
    placeholders = [o for o in parse(overrides) if is_placeholder(o)]
    # A placeholder teacher checkpoint gets a real teacher file (run_tiny); no other one can.
    if any(o.key_or_group != "teacher.checkpoint" for o in placeholders):
        return "a placeholder path: " + " ".join(o.input_line for o in placeholders)
    trainer = cfg.trainer
    if trainer.accelerator not in ("auto", "cpu"):
        return f"trainer.accelerator={trainer.accelerator} (no such device here)"
    if any(name in str(trainer.strategy) for name in ("ddp", "fsdp", "deepspeed")) or trainer.num_nodes != 1:
        return f"several processes (trainer.strategy={trainer.strategy}, num_nodes={trainer.num_nodes})"
    if cfg.data._target_ not in LOCAL_DATA:
        return f"data {cfg.data._target_} is not on this machine (only Fashion-MNIST and fortunes are)"
    if choices.get("hparams_search"):
        return f"hparams_search={choices['hparams_search']}: a study of {cfg.hydra.sweeper.n_trials} runs"
    if choices.get("hydra/launcher") not in (None, "basic"):
        return f"hydra/launcher={choices['hydra/launcher']}: a cluster launcher"
    return None


def lookup(tree: Any, key: str) -> Any:
    """The value at dotted `key` of a plain config (dicts and lists); KeyError when absent."""
    for part in key.split("."):
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        elif isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            raise KeyError(key)
    return tree


def option_keys(group: str, option: str) -> set[str]:
    """The top-level keys a group option's file adds under its group (none for `_global_` files)."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file() or "@package" in path.read_text().split("\n", 1)[0]:
        return set()
    return set(OmegaConf.to_container(OmegaConf.load(path))) - {"defaults"}


def assert_overrides_shown(job: dict, choices: dict, overrides: list[str], replaced: set[str]) -> None:
    """Each override of one job is in its composed config, except keys the budget `replaced`:
    a group's chosen option, a value, a deleted key's absence."""
    for o in parse(overrides):
        key = o.key_or_group
        if key in replaced or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        group = o.get_key_element().lstrip("+~")
        if group in choices or (CONF / key).is_dir():  # a config group
            if o.is_delete():
                assert choices.get(group) is None, (o.input_line, choices.get(group))
            elif isinstance(o.value(), list):  # Hydra records no choice for a list of options
                package = job.get(o.package or key, {})
                for option in o.value():
                    assert option_keys(key, option) <= set(package), (o.input_line, sorted(package))
            else:
                assert choices.get(group) == o.value(), (o.input_line, choices.get(group))
        elif o.is_delete():
            with pytest.raises(KeyError):
                lookup(job, key)
        else:
            assert lookup(job, key) == o.value(), o.input_line


def budget_keys(budget: list[str]) -> set[str]:
    return {o.key_or_group for o in parse(budget)}


# ------------------------------------------------------------------------------------- runs
def assert_printed_job_config(stdout: str, overrides: list[str]) -> None:
    """What `--cfg job` printed is the job config these overrides compose to, and shows them."""
    job = yaml.safe_load(stdout)
    cfg, choices = composed(overrides)
    del cfg.hydra
    assert job == OmegaConf.to_container(cfg), stdout[:2000]
    assert_overrides_shown(job, choices, overrides, replaced=set())


def run_info(command: Command, tmp_path: Path) -> None:
    """--help, --cfg job and the like, run as written."""
    proc = run_main(list(command.args), cwd=tmp_path, env=command.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = list(command.args)
    cfg_flag = next((i for i, arg in enumerate(args) if arg in ("--cfg", "-c")), None)
    if cfg_flag is not None and args[cfg_flag + 1 : cfg_flag + 2] == ["job"]:
        assert_printed_job_config(proc.stdout, command.overrides)
    elif cfg_flag is not None:  # --cfg hydra / all
        assert isinstance(yaml.safe_load(proc.stdout), dict), proc.stdout[:2000]
    elif "--help" in args or "-h" in args:  # the app's help lists every config group
        assert "== Configuration groups ==" in proc.stdout, proc.stdout[:2000]
        for group in sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
            assert f"\n{group}:" in proc.stdout, group
    else:
        assert proc.stdout.strip(), proc.stderr[-3000:]


def run_composed(command: Command, tmp_path: Path) -> None:
    """`--cfg job` appended to each job's overrides (Hydra refuses --cfg together with -m)."""
    for job_overrides in sweep_jobs(command.overrides):
        proc = run_main([*job_overrides, "--cfg", "job"], cwd=tmp_path, env=command.env)
        assert proc.returncode == 0, (job_overrides, proc.stderr[-3000:])
        assert_printed_job_config(proc.stdout, job_overrides)


def real_teacher(overrides: list[str], choices: dict, tmp_path: Path) -> str:
    """A real `teacher.ckpt` for the command's teacher, made as the README's Teachers section says:
    a tiny `mode=baseline` run of the teacher's architecture (on the command's data), whose best
    Lightning checkpoint is returned."""
    data = [o for o in overrides if re.match(r"[+~]*(data[.=]|seed=)", o)]
    teacher = ["mode=baseline", f"model@student={choices['model@teacher']}", *data, *TRIMMINGS]
    proc = run_main([*teacher, *cli_overrides(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return assert_run_finished(tmp_path / "run")["checkpoint"]


def assert_run_finished(job_dir: Path) -> dict:
    """A job's metrics.json, with a test top-1 for every model it reports."""
    results = json.loads((job_dir / "metrics.json").read_text())
    assert results["models"], results
    for row in results["models"]:
        assert 0.0 <= row["test top-1"] <= 1.0, row
    return results


def job_record(job_dir: Path) -> tuple[dict, dict, list[str]]:
    """What Hydra wrote for a job: its config, its group choices and its overrides."""
    hydra_dir = job_dir / ".hydra"
    job = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    choices = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    return job, choices, yaml.safe_load((hydra_dir / "overrides.yaml").read_text())


def run_tiny(command: Command, cfg: Any, choices: dict, tmp_path: Path, teacher_store: Path) -> None:
    """The command with the small budget appended; `cfg` and `choices` are its (first job's)
    composition."""
    args = list(command.args)
    teacher_file = None
    for i, arg in enumerate(args):
        if not arg.startswith("-") and any(is_placeholder(o) for o in parse([arg])):  # teacher.checkpoint
            others = [o for o in command.overrides if o != arg]
            (tmp_path / "teacher").mkdir()
            teacher_file = real_teacher(others, choices, tmp_path / "teacher")
            args[i] = f"teacher.checkpoint={teacher_file}"
    if command.multirun:
        sweep = tmp_path / "sweep"
        budget = [*sweep_overrides(tmp_path, teacher_store=teacher_store), f"hydra.sweep.dir={sweep}"]
    else:
        budget = cli_overrides(tmp_path, teacher_store=teacher_store)
    budget += [trim for trim, needs in TRIMMINGS.items() if OmegaConf.select(cfg, needs) is not None]
    proc = run_main([*args, *budget], cwd=tmp_path, env=command.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if command.multirun:
        job_dirs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    else:
        job_dirs = [tmp_path / "run"]
    replaced = budget_keys(budget)
    ran = []
    for job_dir in job_dirs:
        results = assert_run_finished(job_dir)
        job, choices, overrides = job_record(job_dir)
        # Hydra records a sweep job's overrides normalised (false as False): told apart by key.
        readme_part = [o.input_line for o in parse(overrides) if o.key_or_group not in replaced]
        assert_overrides_shown(job, choices, readme_part, replaced)
        ran.append(sorted(readme_part))
        if teacher_file is not None:
            assert results["teacher"]["source"] == "checkpoint"
            assert results["teacher"]["path"] == teacher_file
    # Every job of the sweep ran (one for a single run).
    expected = [
        sorted(o.input_line for o in parse(job) if o.key_or_group not in replaced)
        for job in sweep_jobs(args_overrides(args))
    ]
    assert sorted(ran) == sorted(expected)


def args_overrides(args: list[str]) -> list[str]:
    return Command("", args=tuple(args)).overrides


@pytest.mark.parametrize("command", [pytest.param(c, id=c.text) for c in COMMANDS])
def test_readme_command(command: Command, tmp_path, teacher_store, request):
    if command.info:
        run_info(command, tmp_path)
        return
    jobs = sweep_jobs(command.overrides)
    cfg, choices = composed(jobs[0])
    reason = compose_only_reason(cfg, choices, command.overrides, len(jobs) if command.multirun else 1)
    # Shown with `pytest -s` / -rA: how the README command was tested.
    print(f"{command.text}: " + (f"composed only ({reason})" if reason else "a tiny run"))
    if reason is not None:
        run_composed(command, tmp_path)
    else:
        request.getfixturevalue("fashion_mnist")  # skipped without the data (a failure on CI)
        run_tiny(command, cfg, choices, tmp_path, teacher_store)


# ------------------------------------------------------------------------ experiment=full
@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_experiment_full_is_the_trainer_groups_own_budget(trainer):
    full = compose_config([f"trainer={trainer}", "experiment=full"])
    # It changes nothing: the same config as no experiment at all, so the trainer group decides.
    assert full == compose_config([f"trainer={trainer}", "~experiment"])
    assert full.trainer.limit_train_batches is None  # every batch of an epoch
    if trainer == "default":
        assert full.trainer.max_epochs == OmegaConf.load(CONF / "trainer" / "default.yaml").max_epochs
    # Unlike the default quickstart's short budget.
    quick = compose_config([f"trainer={trainer}"]).trainer
    assert (quick.max_epochs, quick.limit_train_batches) != (full.trainer.max_epochs, None)


def test_experiment_full_trains_every_batch_of_every_epoch(tmp_path):
    """A run with `experiment=full` trains the trainer group's max_epochs, each over every batch."""
    from tests.test_data import N_TRAIN, write_mnist

    # Full epochs of real data would take minutes: a tiny MNIST (60 images, 10 for validation)
    # in its real format, so the full budget (the trainer group's max_epochs) is cheap here.
    val_size, batch_size = 10, 25  # two batches an epoch
    args = [
        "experiment=full",
        "mode=baseline",
        "data=mnist",
        f"data.root={write_mnist(tmp_path / 'mnist')}",
        "data.download=false",
        f"data.val_size={val_size}",
        f"data.batch_size={batch_size}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.teacher_store={tmp_path / 'teachers'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer.enable_progress_bar=false",
        *TRIMMINGS,
    ]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_run_finished(tmp_path / "run")
    epochs = compose_config(["experiment=full"]).trainer.max_epochs
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == epochs - 1
    assert last["global_step"] == epochs * math.ceil((N_TRAIN - val_size) / batch_size)
