"""Resume and preemption on real Fashion-MNIST: a resumed run is bit-identical to an uninterrupted
one, keeps its logs and refuses another teacher; SIGTERM saves a checkpoint the CLI resumes from."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kdlab.build import build_callbacks
from kdlab.data.base import EpochShuffle
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.resume import EpochSeed, resume_point
from kdlab.run import train
from tests.conftest import NO_PLOTS, ROOT, cli_overrides, compose_config, fast_overrides, run_main


def overrides(root: Path, run: str, epochs: int, *extra: str, store: Path | None = None) -> list[str]:
    """KD + CRD (its memory banks are part of the state) for `epochs` epochs of 3 batches."""
    base = [
        o
        for o in fast_overrides(root, batches=3, teacher_store=store)
        if not o.startswith(("paths.output_dir", "trainer.max"))
    ]
    return [
        *base,
        f"paths.output_dir={root / run}",
        f"trainer.max_epochs={epochs}",
        # One teacher for every run here: by default its budget follows trainer.max_epochs.
        "teacher_training.trainer.max_epochs=1",
        "knowledge=[kd,crd]",
        "knowledge.crd.num_negatives=64",
        # A and B are two runs of one setting: with auto, B (the second) would build the teacher-output
        # cache and read fp16 outputs where A ran the teacher. Resume is what is compared here.
        "teacher_cache.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist, teacher_store):
    """Run A: 2 epochs straight. Run B: 1 epoch, then resumed in place to 2 (with W&B, offline).

    Their teacher comes from the session's store; the store itself is tests/test_run.py's subject.
    """
    root = tmp_path_factory.mktemp("resume")
    uninterrupted = train(compose_config(overrides(root, "A", 2, store=teacher_store)))
    wandb = "logger=[csv,wandb]"
    train(compose_config(overrides(root, "B", 1, wandb, store=teacher_store)))
    first_part = torch.load(root / "B" / "checkpoints" / "last.ckpt", weights_only=False)
    epochs_trained = []
    with pytest.MonkeyPatch.context() as patch:
        seed_epoch = EpochSeed.on_train_epoch_start

        def spy(self, trainer, pl_module):
            epochs_trained.append(trainer.current_epoch)
            seed_epoch(self, trainer, pl_module)

        patch.setattr(EpochSeed, "on_train_epoch_start", spy)
        resumed = train(compose_config(overrides(root, "B", 2, wandb, "ckpt_path=last", store=teacher_store)))
    return root, uninterrupted, resumed, first_part, epochs_trained


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs):
    root, uninterrupted, resumed, first_part, epochs_trained = runs
    assert first_part["epoch"] == 0 and epochs_trained == [1]  # B really stopped, then trained epoch 1 only
    a, b = (torch.load(root / run / "checkpoints" / "last.ckpt", weights_only=False) for run in "AB")
    assert a["global_step"] == b["global_step"] == 6
    assert "knowledge.crd.memory_student" in b["state_dict"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    # Adam's moments too: the resumed part went on from the saved ones, not from zero.
    moments = [ckpt["optimizer_states"][0]["state"] for ckpt in (a, b)]
    assert moments[0] and moments[0].keys() == moments[1].keys()
    for index, state in moments[0].items():
        assert all(torch.equal(value, moments[1][index][name]) for name, value in state.items())
    students = [torch.load(root / run / "student.pt")["state_dict"] for run in "AB"]
    assert all(torch.equal(t, students[1][n]) for n, t in students[0].items())
    tests = [
        {k: v for k, v in r["metrics"].items() if k.startswith("test/")} for r in (uninterrupted, resumed)
    ]
    assert tests[0] and tests[0] == tests[1]
    assert resumed["run_dir"] == str(root / "B")


def test_resumed_run_continues_its_logs(runs):
    root, *_ = runs
    rows = {run: list(csv.DictReader((root / run / "csv" / "metrics.csv").open())) for run in "AB"}
    tested = {run: [row for row in rows[run] if row["test/student/top1"]] for run in "AB"}
    # The first part's rows are kept, its own test included, and the resumed part appends to them:
    # training and validation rows are those of run A, epoch by epoch.
    assert len(tested["A"]) == 1 and len(tested["B"]) == 2 and tested["B"][-1] == tested["A"][0]
    trained = {run: [row for row in rows[run] if row not in tested[run]] for run in "AB"}
    assert {row["epoch"] for row in trained["B"]} == {"0", "1"} and trained["B"] == trained["A"]
    runs_dirs = sorted((root / "B" / "wandb").glob("offline-run-*"))
    assert len(runs_dirs) == 2
    assert runs_dirs[0].name.rsplit("-", 1)[1] == runs_dirs[1].name.rsplit("-", 1)[1]  # one W&B run id


def test_resume_with_another_teacher_is_refused(runs):
    root, uninterrupted, *_ = runs
    other = root / "other_teacher.pt"
    torch.save(
        {"state_dict": create_model("deepnn", num_classes=10, in_channels=1, input_size=28).state_dict()},
        other,
    )
    # Three epochs: B finished its two, so only a longer run has anything to resume.
    cfg = compose_config(overrides(root, "B", 3, "ckpt_path=last", f"teacher.checkpoint={other}"))
    with pytest.raises(KdlabError) as error:
        train(cfg)
    assert uninterrupted["teacher"]["path"] in str(error.value) and str(other) in str(error.value)


def test_missing_or_unusable_checkpoints_are_clear_errors(runs, tmp_path):
    root, *_ = runs
    with pytest.raises(KdlabError, match=f"no checkpoint to resume in the run directory {tmp_path / 'run'}"):
        train(compose_config([*fast_overrides(tmp_path), "ckpt_path=last"]))
    with pytest.raises(KdlabError, match="nope.ckpt"):
        train(compose_config([*fast_overrides(tmp_path), f"ckpt_path={tmp_path / 'nope.ckpt'}"]))
    with pytest.raises(KdlabError, match="weights only"):
        train(compose_config([*fast_overrides(tmp_path), f"ckpt_path={root / 'A' / 'student.pt'}"]))


def test_a_requeued_slurm_job_resumes_from_its_run_directory(runs, monkeypatch):
    root, *_ = runs
    cfg = compose_config(overrides(root, "B", 2))
    assert resume_point(cfg, root / "B") is None
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "kdlab")
    point = resume_point(cfg, root / "B")
    assert point.checkpoint == root / "B" / "checkpoints" / "last.ckpt" and point.same_run


def test_one_callback_writes_last_ckpt(tmp_path):
    """`ckpt_path=last` resumes from last.ckpt: the default callbacks have exactly one writer of it,
    saving at every epoch end (the best-model checkpoint's save_last would write it only with a new
    best)."""
    callbacks = build_callbacks(compose_config(fast_overrides(tmp_path)))
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    writers = [c for c in checkpoints if c.save_last or c.filename == ModelCheckpoint.CHECKPOINT_NAME_LAST]
    assert len(checkpoints) == 2 and len(writers) == 1
    assert writers[0].monitor is None and writers[0].save_top_k == 1


def test_train_order_is_a_function_of_seed_and_epoch():
    data = range(100)
    sampler = EpochShuffle(data, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(data) and first != second
    # Epoch 1 drawn straight away, as by a run resumed there, is the same order.
    assert list(EpochShuffle(data, seed=3, epoch=1)) == second
    assert list(EpochShuffle(data, seed=4, epoch=1)) != second


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path, fashion_mnist):
    # No figures: the runs above resume with them (their callback's state is in the checkpoint).
    args = [o for o in cli_overrides(tmp_path, batches=20) if not o.startswith("trainer.max_epochs")]
    args.append(NO_PLOTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    run_dir, stderr_file = tmp_path / "run", tmp_path / "stderr.txt"
    with stderr_file.open("w") as stderr:  # a file, not a pipe: nothing blocks on a full buffer
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdlab.run", *args, "mode=baseline", "trainer.max_epochs=3"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            # The first epoch's checkpoint means the fit is running, with two epochs to go.
            deadline = time.monotonic() + 300
            while not (run_dir / "checkpoints" / "last.ckpt").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint before the run ended:\n{stderr_file.read_text()[-3000:]}")
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    message = stderr_file.read_text()
    assert proc.returncode != 0, message[-3000:]
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert preempted.exists() and not (run_dir / "metrics.json").exists()
    assert torch.load(preempted, weights_only=False)["epoch"] >= 1
    assert f"saved in {preempted}" in message
    command = next(line.strip() for line in message.splitlines() if " -m kdlab.run " in line)
    assert f"hydra.run.dir={run_dir}" in command and command.endswith("ckpt_path=last")

    resumed = subprocess.run(
        shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Lightning's own line, in the run's log (the console keeps to what a researcher reads).
    assert f"Restoring states from the checkpoint path at {preempted}" in (run_dir / "run.log").read_text()
    assert (run_dir / "metrics.json").exists() and not preempted.exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, fashion_mnist, teacher_store):
    args = [*cli_overrides(tmp_path, teacher_store=teacher_store), NO_PLOTS]
    # ckpt_path=auto in a directory with no checkpoint: a fresh run.
    first = run_main([*args, "ckpt_path=auto"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "run"
    before = file_digests(run_dir)
    for resume in ("ckpt_path=last", "ckpt_path=auto"):  # auto: how a sweep's rerun skips its finished jobs
        again = run_main([*args, resume], cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "has already finished" in again.stdout and str(run_dir / "metrics.json") in again.stdout
        assert file_digests(run_dir) == before  # metrics.json, the CSV, .hydra/ and run.log included
    # The same from Python (no command line to check first): the results come back, untouched.
    cfg = compose_config([*fast_overrides(tmp_path, teacher_store=teacher_store), "ckpt_path=last"])
    results = train(cfg)
    assert results["models"] == json.loads((run_dir / "metrics.json").read_text())["models"]
    assert file_digests(run_dir) == before
