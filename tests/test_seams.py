"""The seams every method plugs into: what a scheme obtains, what a loss is given, where the store is.

- A scheme obtains its own sources (`Scheme.sources_for`), the same way for every caller.
- A loss gets its run context as an argument and keeps the name it was configured under; no
  scheme writes attributes onto it, and its configured layer list is never rewritten.
- The store mechanics are one leaf module, and kdlab's modules import one another without a cycle.
"""

from __future__ import annotations

import ast
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from kdlab.build import build_knowledge, build_scheme, instantiate, scheme_class
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.schemes import BYOT, CSKD, PSKD, Baseline, BornAgain, Offline, Online, TfKD
from kdlab.store import build_once
from kdlab.teachers import TeacherStore
from tests.conftest import ROOT, compose_config, fast_overrides


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    path = tmp_path / "teacher.pt"
    model = create_model("deepnn", num_classes=10, in_channels=1, input_size=28)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def sources(cfg, tmp_path):
    datamodule = instantiate(cfg.data)
    return datamodule, scheme_class(cfg).sources_for(cfg, datamodule, TeacherStore(tmp_path / "store"))


@pytest.mark.parametrize(
    ("mode", "cls"),
    [
        ("offline", Offline),
        ("online", Online),
        ("self", BYOT),
        ("byot", BYOT),
        ("pskd", PSKD),
        ("baseline", Baseline),
        ("born_again", BornAgain),
        ("cskd", CSKD),
        ("tfkd", TfKD),
    ],
)
def test_mode_selects_an_ordinary_scheme_class(mode, cls, tmp_path):
    assert scheme_class(compose_config([*fast_overrides(tmp_path), f"mode={mode}"])) is cls


def test_offline_obtains_its_frozen_teacher_through_the_store(tmp_path, teacher_file, fashion_mnist):
    cfg = compose_config([*fast_overrides(tmp_path), f"teacher.checkpoint={teacher_file}"])
    datamodule, found = sources(cfg, tmp_path)
    assert found.frozen.source == "checkpoint" and found.frozen.path == str(teacher_file)
    assert set(found.modules) == {"teacher"} and found.frozen_config.name == "deepnn"
    scheme = build_scheme(cfg, datamodule, build_knowledge(cfg), found.modules)
    assert not scheme.teacher.training and not any(p.requires_grad for p in scheme.teacher.parameters())


def test_online_obtains_fresh_trainable_peers(tmp_path, fashion_mnist):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=online", "mode.extra_peers=[resnet8]"])
    _, found = sources(cfg, tmp_path)
    assert found.frozen is None and set(found.modules) == {"teacher", "extra_peers"}
    assert found.architectures == {"teacher": "deepnn", "peer3": "resnet8"}
    assert all(p.requires_grad for p in found.modules["teacher"].parameters())


def test_self_distillation_and_baseline_obtain_nothing(tmp_path, caplog):
    for mode, says_unused in (("self", False), ("pskd", False), ("baseline", True)):
        caplog.clear()
        cfg = compose_config([*fast_overrides(tmp_path), f"mode={mode}"])
        with caplog.at_level(logging.INFO):
            _, found = sources(cfg, tmp_path)
        assert found.modules == {} and found.frozen is None
        # Only the baseline ignores knowledge; BYOT and PS-KD use it.
        assert ("is not used" in caplog.text) == says_unused, mode


def test_a_scheme_neither_writes_onto_its_losses_nor_rewrites_their_layers(tmp_path, teacher_file):
    cfg = compose_config(
        [*fast_overrides(tmp_path), f"teacher.checkpoint={teacher_file}", "knowledge=[kd,at]"]
    )
    knowledge = build_knowledge(cfg)
    datamodule, found = sources(cfg, tmp_path)
    scheme = build_scheme(cfg, datamodule, knowledge, found.modules)
    # The configured losses keep their configured layers; the scheme's live copies read the expansion.
    assert knowledge["at"].student_layers == ("stages",)
    assert scheme.knowledge["at"].student_layers == ("stage1", "stage2")
    for term in (*knowledge.values(), *scheme.knowledge.values()):
        assert not hasattr(term, "epoch") and not hasattr(term, "num_samples")
    context = scheme.loss_context()
    assert context.num_samples == datamodule.train_split_size and context.epoch == 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["mode=online", "knowledge=dml", "knowledge.dml.temperature=0"], "knowledge.dml.temperature"),
        (["mode=self", "knowledge.l2.weight=-1"], "knowledge.l2.weight"),
        (["knowledge=[kd,cosine]", "knowledge.cosine.weight=-2"], "knowledge.cosine.weight"),
    ],
)
def test_a_loss_error_names_the_key_the_user_typed(overrides, key, tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), *overrides])
    with pytest.raises(KdlabError, match=rf"^{key}=") as error:
        build_knowledge(cfg)
    assert f"e.g. {key}=" in str(error.value)  # and the advice uses the same key


def module_imports(path: Path) -> set[str]:
    """The kdlab modules `path` imports when it is imported (not under TYPE_CHECKING or in functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdlab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("kdlab")}
    return found


def test_the_store_is_a_leaf_and_kdlab_has_no_import_cycle():
    package = ROOT / "kdlab"
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = module_imports(path)
    assert graph["kdlab.store"] == set()
    assert "kdlab.teachers" not in graph["kdlab.teacher_cache"]

    def visit(name, trail):
        assert name not in trail, f"import cycle: {' -> '.join([*trail, name])}"
        for child in graph.get(name, set()) - {name}:  # a package importing its own names
            visit(child, [*trail, name])

    for name in graph:
        visit(name, [])


def test_a_process_waiting_on_a_build_says_what_it_waits_for(tmp_path, caplog):
    entry, held = tmp_path / "entry", threading.Event()

    def another_process():  # a thread stands in for it: it holds the entry's lock for a while
        with FileLock(f"{entry}.lock"):
            held.set()
            time.sleep(0.5)

    threading.Thread(target=another_process, daemon=True).start()
    held.wait()
    with caplog.at_level(logging.INFO, logger="kdlab.store"):
        built = build_once(entry, "done", lambda e: (e / "done").write_text("x"), "training the teacher t")
    assert built and "Waiting for another process that is training the teacher t" in caplog.text


def test_building_a_run_draws_nothing_from_the_seeded_rng(tmp_path):
    # The student's and teacher's initial weights follow the seed; checking the optimizer settings
    # early (kdlab.build.optimisation) must not shift them.
    from kdlab.build import optimisation

    cfg = compose_config([*fast_overrides(tmp_path), "teacher_training.optimizer.lr=0.05"])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    optimisation(cfg, cfg.teacher_training.optimizer)
    build_knowledge(cfg)
    assert torch.equal(before, torch.get_rng_state())
