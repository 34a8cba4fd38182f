"""The teacher store: keyed by what determines a teacher, reused, and never half-written."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from kdlab.store import content_key
from kdlab.teachers import WEIGHTS, TeacherStore, teacher_spec
from tests.conftest import compose_config, fast_overrides


def spec_for(tmp_path, *overrides):
    return teacher_spec(compose_config([*fast_overrides(tmp_path), *overrides]))


def test_key_changes_with_what_determines_the_teacher(tmp_path):
    base = content_key(spec_for(tmp_path))
    for override in (
        "model@teacher=resnet8",
        "teacher_training.seed=1",
        "optimizer.lr=0.01",
        "trainer.max_epochs=3",
        "teacher_training.trainer.max_epochs=5",
        "data.batch_size=64",
        "data=mnist",
    ):
        assert content_key(spec_for(tmp_path, override)) != base, override


def test_key_ignores_what_does_not(tmp_path):
    base = content_key(spec_for(tmp_path))
    for override in (
        "knowledge.kd.temperature=1",
        "seed=1",  # the run's seed varies the student; the teacher has its own (teacher_training.seed)
        "model@student=resnet8",
        "data.num_workers=2",
        "data.root=/elsewhere",
        "trainer.enable_progress_bar=true",
        "logger=wandb",
    ):
        assert content_key(spec_for(tmp_path, override)) == base, override


def fake_training(calls):
    def train(entry):
        calls.append(entry)
        return {"w": torch.ones(2)}, {"val/teacher/top1": 0.5}

    return train


def test_second_request_reuses_the_stored_teacher(tmp_path):
    store, spec, calls = TeacherStore(tmp_path), {"model": {"name": "m"}, "x": 1}, []
    first = store.fetch_or_train(spec, fake_training(calls))
    second = store.fetch_or_train(spec, fake_training(calls))
    assert (first.source, second.source) == ("trained", "store")
    assert first.path == second.path and len(calls) == 1
    saved = torch.load(first.path, weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.ones(2)) and saved["spec"] == spec


def test_a_run_killed_while_storing_leaves_no_teacher(tmp_path, monkeypatch):
    store, spec, calls = TeacherStore(tmp_path), {"model": {"name": "m"}}, []

    def killed_save(obj, path):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_save)
        with pytest.raises(KeyboardInterrupt):
            store.fetch_or_train(spec, fake_training(calls))
    entry = store.entry(spec)
    assert not entry.exists()  # an interrupted build leaves no entry at all

    # A SIGKILL skips all cleanup: a stray temporary file stays, and must not count.
    entry.mkdir()
    (entry / f".{WEIGHTS}.999.tmp").write_bytes(b"torn")
    record = store.fetch_or_train(spec, fake_training(calls))
    assert record.source == "trained" and len(calls) == 2
    assert not list(entry.glob(".*.tmp"))


def _slow_fetch(root, counter):
    def train(entry):
        with counter.get_lock():
            counter.value += 1
        time.sleep(1.0)
        return {"w": torch.zeros(1)}, {}

    return TeacherStore(root).fetch_or_train({"model": {"name": "m"}}, train).source


def test_concurrent_jobs_train_the_teacher_once(tmp_path):
    ctx = mp.get_context("fork")
    counter = ctx.Value("i", 0)
    procs = [ctx.Process(target=_slow_fetch, args=(str(tmp_path), counter)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.value == 1
    assert (TeacherStore(tmp_path).entry({"model": {"name": "m"}}) / WEIGHTS).exists()
