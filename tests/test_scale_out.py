"""Scale-out: the multi-GPU and SLURM configs build on a CPU, and DDP runs on two CPU processes.

There is no GPU and no SLURM here, so each GPU option is checked as far as a CPU allows: it
composes, resolves and builds every non-Trainer part, and its Trainer builds once
`accelerator=cpu`. DDP itself runs for real on two CPU processes (gloo), once with `ddp_spawn`
through the CLI and once as two SLURM tasks started at the same moment, as srun would start
them. The CSV logger's fit and test copies under ddp_spawn are also checked on their own.
docs/scale-out.md explains which combinations work and why.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from kdlab.build import (
    build_callbacks,
    build_knowledge,
    build_model,
    build_scheme,
    build_trainer,
    instantiate,
)
from kdlab.data.datasets import collate
from kdlab.loggers import CSVLogger
from kdlab.run import train
from tests.conftest import CONF, ROOT, cli_overrides, compose_config, fast_overrides, run_cli

# Each CPU "device" is one process; the per-process batch and batch limits apply to each.
WORLD = 2
BATCH = 32
TRAIN_BATCHES = 20
TEACHER_BATCHES = 10  # the teacher only has to be the same in both runs, not good
TEST_BATCHES = 8
# The first WORLD x TEST_BATCHES x BATCH test images: DistributedSampler (no shuffling on test)
# gives rank r the images r, r + WORLD, ..., so together the ranks test exactly these.
TEST_IMAGES = WORLD * TEST_BATCHES * BATCH
# DDP and one process differ in the order batches are drawn (DistributedSampler's permutation)
# and in the dropout and augmentation draws, so they train two different students, as two
# seeds do. 13 single-process runs of this budget that differed only in those draws, or in the
# training split (data.split_seed), scored 0.350 to 0.395 (std 0.011); 0.08 is five standard
# deviations of the difference between two such runs.
TOP1_TOLERANCE = 0.08


@pytest.mark.parametrize(
    ("overrides", "strategy", "devices", "nodes", "precision", "env"),
    [
        (["trainer=gpu"], SingleDeviceStrategy, 1, 1, "bf16-mixed", {}),
        (
            ["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.devices=4"],
            DDPStrategy,
            4,
            1,
            "bf16-mixed",
            {},
        ),
        (
            ["trainer=ddp", "trainer.devices=4", "trainer.sync_batchnorm=true"],
            DDPStrategy,
            4,
            1,
            "32-true",
            {},
        ),
        (["trainer=ddp_spawn", "trainer.devices=2"], DDPStrategy, 2, 1, "32-true", {}),
        (
            ["trainer=slurm"],
            DDPStrategy,
            4,
            2,
            "bf16-mixed",
            {"SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"},
        ),
    ],
    ids=["gpu", "gpu-bf16-4", "ddp-4-syncbn", "ddp_spawn-2", "slurm-2x4"],
)
def test_gpu_and_cluster_configs_build_on_a_cpu(
    tmp_path, fashion_mnist, monkeypatch, overrides, strategy, devices, nodes, precision, env
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = compose_config([*fast_overrides(tmp_path), *overrides])
    resolved = OmegaConf.to_container(cfg.trainer, resolve=True)  # e.g. trainer=slurm's SLURM variables
    assert (resolved["devices"], resolved["num_nodes"]) == (devices, nodes)

    datamodule = instantiate(cfg.data)
    teacher = build_model(cfg.teacher)
    scheme = build_scheme(cfg, datamodule, build_knowledge(cfg), teacher=teacher)
    assert scheme.teacher is teacher and build_callbacks(cfg)

    if resolved["accelerator"] == "gpu" and not torch.cuda.is_available():
        # Lightning checks for the device when the Trainer is built, not when fit starts.
        with pytest.raises(InstantiationException, match="No supported gpu backend") as error:
            build_trainer(cfg, logger=False)
        assert isinstance(error.value.__cause__, MisconfigurationException)
    trainer = build_trainer(cfg, {"accelerator": "cpu"}, logger=False)
    assert isinstance(trainer.strategy, strategy)
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size) == (devices, nodes, devices * nodes)
    # fp16 AMP does not exist on a CPU: Lightning runs 16-mixed as bf16-mixed there.
    assert trainer.precision == precision


def test_slurm_launcher_gives_one_task_per_gpu(tmp_path):
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        # CI installs the slurm extra, so there its absence is a failure, as for the data.
        if os.environ.get("CI"):
            pytest.fail("hydra-submitit-launcher is missing: scripts/setup.sh must install kdlab[slurm]")
        pytest.skip("hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    overrides = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.launcher.nodes=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="run", overrides=[*fast_overrides(tmp_path), *overrides], return_hydra_config=True
        )
    # Built as Hydra builds it for a multirun, without submitting anything.
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == launcher.params["gpus_per_node"] == 8
    assert launcher.params["nodes"] == 2 and launcher.params["gpus_per_task"] is None


def test_sync_batchnorm_keeps_the_teacher_frozen_and_the_taps_working(tmp_path):
    cfg = compose_config(
        [*fast_overrides(tmp_path), "model@teacher=resnet14", "model@student=resnet8", "knowledge=fitnet"]
    )
    scheme = build_scheme(cfg, instantiate(cfg.data), build_knowledge(cfg), teacher=build_model(cfg.teacher))
    # What Lightning does to the module with sync_batchnorm=true, before any process group exists.
    scheme = TorchSyncBatchNorm().apply(scheme).train()
    assert isinstance(scheme.teacher.bn1, torch.nn.SyncBatchNorm) and not scheme.teacher.bn1.training
    assert not any(p.requires_grad for p in scheme.teacher.parameters())
    logged = {}
    scheme.log_terms = lambda terms, loss: logged.update(terms)
    batch = {"input": torch.randn(4, 1, 28, 28), "target": torch.arange(4), "index": torch.arange(4)}
    assert torch.isfinite(scheme.training_step(batch, 0))
    assert set(logged) == {"task", "fitnet"}  # the stage2 taps survived the module swap


def evaluate(cfg, student_file: str, teacher_file: str, images: range) -> dict[str, torch.Tensor]:
    """Per-image student/teacher logits on `images` of the test split, in one process."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    student = build_model(cfg.student, checkpoint=student_file).eval()
    teacher = build_model(cfg.teacher, checkpoint=teacher_file).eval()
    out = {"student": [], "teacher": [], "target": []}
    with torch.no_grad():
        # In-memory data hands out whole batches (__getitems__), which its own collate passes through.
        for batch in DataLoader(Subset(datamodule.test_set, images), batch_size=128, collate_fn=collate):
            out["student"].append(student(batch["input"]))
            out["teacher"].append(teacher(batch["input"]))
            out["target"].append(batch["target"])
    return {name: torch.cat(values) for name, values in out.items()}


def fraction(hits: torch.Tensor) -> float:
    return hits.sum().item() / hits.numel()


def offline_metrics(logits: dict[str, torch.Tensor], rows: slice = slice(None)) -> dict[str, float]:
    """The offline scheme's test metrics on `rows`, counted by hand: top-1 and agreement as fractions
    of the images, and the mean KL."""
    student, teacher, target = (logits[name][rows] for name in ("student", "teacher", "target"))
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none")
    return {
        "test/student/top1": fraction(student.argmax(1) == target),
        "test/teacher/top1": fraction(teacher.argmax(1) == target),
        "test/student/agreement": fraction(student.argmax(1) == teacher.argmax(1)),
        "test/student/kl_to_teacher": float(kl.sum(1).mean()),
    }


def test_ddp_spawn_on_two_cpu_processes_matches_one_process(tmp_path, fashion_mnist):
    args = [
        *cli_overrides(tmp_path, batches=TRAIN_BATCHES),
        f"teacher_training.trainer.limit_train_batches={TEACHER_BATCHES}",
        f"data.batch_size={BATCH}",
        f"trainer.limit_test_batches={TEST_BATCHES}",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp_spawn",
        f"trainer.devices={WORLD}",
    ]
    done = run_cli(args, cwd=tmp_path)  # the default logger=csv
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # fit and test ran in different workers; metrics.csv holds both: the fit's rows, then the
    # test metrics in the test's row, as metrics.json has them.
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert {"train/loss_epoch", "train/kd_epoch", "val/student/top1"} <= set(rows[0])
    assert any(row["train/loss_epoch"] for row in rows) and any(row["val/student/top1"] for row in rows)
    [test_row] = [row for row in rows if row["test/student/top1"]]
    tested = [name for name in metrics["metrics"] if name.startswith("test/")]
    assert {"test/student/top1", "test/teacher/top1"} <= set(tested)
    for name in tested:
        assert float(test_row[name]) == pytest.approx(metrics["metrics"][name], abs=1e-6), name
    # The loss terms' epoch values are synced over the ranks, so Lightning does not warn about them.
    assert "sync_dist=True" not in done.stderr, done.stderr[-3000:]
    assert {"train/loss", "train/loss_epoch", "train/kd_epoch", "train/task_epoch"} <= set(metrics["metrics"])

    # The teacher was trained once, in the main process before any worker started, and whole.
    log = (run_dir / "run.log").read_text()
    assert log.count("No stored teacher") == 1 and metrics["teacher"]["source"] == "trained"
    # The store may also hold the teacher-output cache's folder (outputs/).
    [entry] = [p for p in (tmp_path / "teachers").iterdir() if p.is_dir() and p.name != "outputs"]
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "teacher.pt", "train_log"]

    # The logged test metrics are over both ranks' images: a single-process evaluation of the saved
    # student on all TEST_IMAGES reproduces them, while either rank's half alone gives other values.
    cfg = compose_config(fast_overrides(tmp_path))
    logits = evaluate(cfg, metrics["student_weights"], metrics["teacher"]["path"], range(TEST_IMAGES))
    whole = offline_metrics(logits)
    for name, value in whole.items():
        assert metrics["metrics"][name] == pytest.approx(value, abs=1e-5), name
    for rank in range(WORLD):
        half = offline_metrics(logits, slice(rank, None, WORLD))["test/student/kl_to_teacher"]
        assert abs(half - whole["test/student/kl_to_teacher"]) > 1e-4

    # The same training in one process: the same teacher, the same effective batch (WORLD x BATCH)
    # and number of steps, tested on the same images.
    single = train(
        compose_config(
            [
                *fast_overrides(tmp_path / "single", batches=TRAIN_BATCHES),
                f"data.batch_size={WORLD * BATCH}",
                f"trainer.limit_test_batches={TEST_BATCHES}",
                f"teacher.checkpoint={metrics['teacher']['path']}",
                "logger=none",
                "callbacks=none",
            ]
        )
    )["metrics"]
    assert single["test/teacher/top1"] == pytest.approx(metrics["metrics"]["test/teacher/top1"], abs=1e-6)
    assert single["test/student/top1"] == pytest.approx(
        metrics["metrics"]["test/student/top1"], abs=TOP1_TOLERANCE
    )


@pytest.mark.parametrize("logger_class", [CSVLogger, LightningCSVLogger], ids=["kdlab", "lightning"])
def test_csv_logger_copies_write_one_file(tmp_path, logger_class):
    """What ddp_spawn does to a logger: fit and test workers each unpickle the main process's copy."""
    main = logger_class(tmp_path, name="csv", version="")
    main.log_hyperparams({"seed": 0})  # as run.py does before fit: the main process's writer exists
    fit, test = (pickle.loads(pickle.dumps(main)) for _ in range(2))
    fit.log_metrics({"train/loss_epoch": 2.0, "val/student/top1": 0.5}, step=2)
    fit.finalize("success")
    test.log_metrics({"test/student/top1": 0.25}, step=0)
    if logger_class is LightningCSVLogger:
        # The cause: the test copy's writer knows no column, so it rewrites the file with its own
        # alone, fails on the fit's rows, and leaves the header only.
        with pytest.raises(ValueError, match="dict contains fields not in fieldnames"):
            test.finalize("success")
        assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["step,test/student/top1"]
        return
    test.finalize("success")
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert set(rows[0]) == {"step", "train/loss_epoch", "val/student/top1", "test/student/top1"}
    columns = ("step", "train/loss_epoch", "val/student/top1", "test/student/top1")
    assert [tuple(row[c] for c in columns) for row in rows] == [
        ("2", "2.0", "0.5", ""),
        ("0", "", "", "0.25"),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_slurm_tasks_started_at_once_train_the_teacher_once(tmp_path, fashion_mnist):
    """Two tasks of one node, started together as `srun --ntasks-per-node=2` starts them."""
    args = [*cli_overrides(tmp_path), "trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "kdlab",
        "SLURM_NTASKS": str(WORLD),
        "SLURM_NNODES": "1",
    }
    slurm |= {"SLURM_NTASKS_PER_NODE": str(WORLD), "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    slurm |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **slurm}
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "kdlab.run", *args],
            cwd=tmp_path,
            env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    try:
        outputs = [task.communicate(timeout=300)[0] for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    assert [task.returncode for task in tasks] == [0] * WORLD, outputs[0][-3000:] + outputs[1][-3000:]
    # The task count came from SLURM (Lightning's line: in the run's log, off the console).
    assert f"MEMBER: {WORLD}/{WORLD}" in (tmp_path / "run" / "run.log").read_text()

    # One task trained the teacher while the other waited on the store's lock, then loaded it.
    both = "".join(outputs)
    assert both.count("No stored teacher") == 1
    assert both.count("Teacher deepnn: trained") == 1 and both.count("Teacher deepnn: store") == 1
    # The store may also hold the teacher-output cache's folder (outputs/).
    [entry] = [p for p in (tmp_path / "teachers").iterdir() if p.is_dir() and p.name != "outputs"]
    # Whole files only; the training log exists when rank 0 won the lock (loggers write on rank 0).
    names = {p.name for p in entry.iterdir()}
    assert {"meta.json", "teacher.pt"} <= names <= {"meta.json", "teacher.pt", "train_log"}
    assert torch.load(entry / "teacher.pt", weights_only=True)["state_dict"]

    # Rank 0 alone writes the outputs and prints the results table.
    tables = [[line for line in out.splitlines() if line.startswith("| student")] for out in outputs]
    assert sorted(len(table) for table in tables) == [0, 1]
    assert (tmp_path / "run" / "metrics.json").is_file()
