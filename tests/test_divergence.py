"""A diverged run stops at once with a clear error, and a diverged teacher is never stored or reused."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.store import content_key
from kdlab.teachers import WEIGHTS, TeacherStore
from tests.conftest import NO_PLOTS, cli_overrides, run_main

# The reported case: a learning rate that blows the teacher up within five steps, fewer than the
# loggers' cadence (trainer.log_every_n_steps, Lightning's 50), where the check used to run.
DIVERGING = ["optimizer.lr=1e6", "trainer.max_epochs=1", "trainer.limit_train_batches=5"]


def test_a_diverging_run_stops_and_stores_no_teacher(tmp_path, fashion_mnist):
    store = tmp_path / "teachers"
    args = [*cli_overrides(tmp_path, teacher_store=store), *DIVERGING, NO_PLOTS]
    first = run_main(args, cwd=tmp_path)
    assert first.returncode != 0
    message = first.stderr
    assert "The training loss became nan at step" in message and "optimizer.lr" in message, message
    assert "Traceback" not in message
    assert not list(store.rglob(WEIGHTS)), "a diverged teacher was stored"
    assert not [p for p in store.iterdir() if p.is_dir()], "an entry of the diverged teacher was left"
    # The same command again trains again (and fails again): nothing was left to reuse.
    second = run_main([*args, f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path)
    assert second.returncode != 0 and "The training loss became nan" in second.stderr
    assert not list(store.rglob(WEIGHTS))


def test_the_store_refuses_weights_that_are_not_finite(tmp_path):
    store, spec = TeacherStore(tmp_path), {"model": {"name": "m"}}

    def diverged(entry):
        return {"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor(3)}, {}

    with pytest.raises(KdlabError, match=r"non-finite weights \(1 tensors, e.g. w\), so it is not stored"):
        store.fetch_or_train(spec, diverged)
    # Only the entry's lock file stays (deleting a lock others may wait on would let two builds run).
    assert not store.entry(spec).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"m-{content_key(spec)}.lock"]
