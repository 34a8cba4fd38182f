"""The teacher-output cache for a language model's token logits (kdlab/teacher_cache/, task=lm).

On a small corpus of real text (the first 400 entries of Debian's fortunes, written back in the fortune
format): the cache stores the teacher's logits at every position of every training window, in fp16 or
as the top-k plus the tail's mass, and what it serves agrees with the live teacher.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.build import build_knowledge, build_model, build_scheme, instantiate
from kdlab.data.text import read_documents
from kdlab.resume import teacher_identity
from kdlab.run import train
from kdlab.schemes import Offline
from kdlab.teacher_cache import MARKER, load_or_build, plan
from kdlab.teachers import TeacherRecord
from tests.conftest import compose_config, lm_overrides


@pytest.fixture(scope="module")
def small_corpus(fortunes, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "small.u8").write_text("\n%\n".join(read_documents(fortunes)[:400]) + "\n")
    return folder


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory, small_corpus) -> Path:
    cfg = compose_config(lm_overrides(tmp_path_factory.mktemp("t")))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"state_dict": build_model(cfg.teacher).state_dict()}, path)
    return path


def config(tmp_path, corpus, teacher, *extra):
    return compose_config(
        [
            *lm_overrides(tmp_path),
            f"data.root={corpus}",
            f"teacher.checkpoint={teacher}",
            f"teacher_cache.dir={tmp_path / 'cache'}",
            *extra,
        ]
    )


@pytest.mark.parametrize("codec", ["fp16", "topk"])
def test_cached_token_logits_agree_with_the_live_teacher(tmp_path, small_corpus, lm_teacher, codec):
    cfg = config(
        tmp_path, small_corpus, lm_teacher, "teacher_cache.enabled=true", f"teacher_cache.logits={codec}"
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    teacher = build_model(cfg.teacher)
    weights = teacher_identity(TeacherRecord("checkpoint", str(lm_teacher)), teacher, cfg.teacher.name)[
        "sha256"
    ]
    scheme = build_scheme(cfg, datamodule, build_knowledge(cfg), teacher=teacher)
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    assert cache.usable and cache.layout.positions == (32,)
    outputs, views = load_or_build(
        cache.entry, cache.layout, scheme.teacher_forward, datamodule, torch.device("cpu"), 64
    )
    assert views is None
    windows = len(datamodule.splits["train"])
    index = torch.tensor([0, 5, windows - 1])
    batch = {"input": datamodule.splits["train"].inputs[index], "index": index}
    live = scheme.teacher_forward(batch["input"]).logits
    scheme.use_teacher_outputs(outputs)
    served = scheme.sources(batch["input"], batch).logits
    assert served.shape == live.shape == (3, 32, 257)
    if codec == "fp16":
        torch.testing.assert_close(served, live, rtol=2e-3, atol=2e-3)
    else:  # the top-5 probabilities and the tail's mass, at each position, as the teacher gives them
        k = cfg.teacher_cache.topk
        p_live, p_served = live.softmax(-1), served.softmax(-1)
        top = live.topk(k, dim=-1).indices
        torch.testing.assert_close(p_served.gather(-1, top), p_live.gather(-1, top), rtol=5e-3, atol=1e-3)
        tail_live = 1 - p_live.gather(-1, top).sum(-1)
        tail_served = 1 - p_served.gather(-1, top).sum(-1)
        torch.testing.assert_close(tail_served, tail_live, rtol=5e-3, atol=1e-3)


def test_an_lm_run_serves_the_teacher_from_the_cache(tmp_path, small_corpus, lm_teacher, monkeypatch):
    calls = []
    forward = Offline.teacher_forward

    def spy(self, x):  # records whether the teacher ran although its outputs were being served
        calls.append("despite the cache" if self.teacher_outputs is not None else "before serving")
        return forward(self, x)

    monkeypatch.setattr(Offline, "teacher_forward", spy)
    results = train(config(tmp_path, small_corpus, lm_teacher, "teacher_cache.enabled=true"))
    assert len(list((tmp_path / "cache").glob(f"*/{MARKER}"))) == 1
    # Training batches came from the cache; held-out validation text runs the teacher (2 batches here:
    # Lightning's sanity check and the epoch's), as does the test.
    assert "before serving" in calls and calls.count("despite the cache") == 2
    assert results["metrics"]["test/student/perplexity"] > 1
