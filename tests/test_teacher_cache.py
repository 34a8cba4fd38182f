"""Tests for the teacher-output cache (kdlab/teacher_cache/) on a small copy of real Fashion-MNIST.

The copy (600 training and 100 test images of the real files, in the real IDX format) keeps a
cache build to a second; the teacher is an untrained DeepNN saved as a checkpoint, which is all
the cache cares about: its outputs must be the ones the teacher gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from kdlab.build import build_knowledge, build_model, build_scheme, instantiate
from kdlab.data.idx import read_idx
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.resume import teacher_identity
from kdlab.run import train
from kdlab.schemes import Offline
from kdlab.teacher_cache import MARKER, TeacherCache, cache_callback, load_or_build, plan
from kdlab.teachers import TeacherRecord
from tests.conftest import compose_config, fast_overrides
from tests.test_data import write_idx

N_TRAIN, N_TEST = 600, 100


@pytest.fixture(scope="module")
def small_fashion_mnist(fashion_mnist: Path, tmp_path_factory) -> Path:
    """The first images of the real Fashion-MNIST splits, written back in the IDX format."""
    folder = tmp_path_factory.mktemp("fashion-mnist-small")
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            array = read_idx(
                fashion_mnist / f"{prefix}-{kind}.gz", ndim=3 if kind.startswith("images") else 1
            )
            write_idx(folder / f"{prefix}-{kind}", array[:n].numpy(), gz=True)
    return folder


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("deepnn", num_classes=10, in_channels=1, input_size=28)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def overrides(tmp_path: Path, data_root: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        *fast_overrides(tmp_path, batches=4),
        "teacher_cache.enabled=auto",  # the default, which fast_overrides turns off for other tests
        f"data.root={data_root}",
        "data.val_size=100",
        "data.train_transforms=[]",
        f"teacher.checkpoint={teacher}",
        f"teacher_cache.dir={tmp_path / 'cache'}",
        *extra,
    ]


def setup(cfg):
    """The datamodule, knowledge and offline scheme a run of `cfg` builds, and its teacher identity."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher = build_model(cfg.teacher)
    identity = teacher_identity(
        TeacherRecord("checkpoint", cfg.teacher.checkpoint), teacher, cfg.teacher.name
    )
    scheme = build_scheme(cfg, datamodule, build_knowledge(cfg), teacher=teacher)
    return datamodule, scheme, identity["sha256"]


def built(cfg, datamodule, scheme, weights):
    """The cache `cfg` plans, built (or read) the way a run's callback does: (plan, outputs, views)."""
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    outputs, views = load_or_build(
        cache.entry, cache.layout, scheme.teacher_forward, datamodule, torch.device("cpu"), 128
    )
    return cache, outputs, views


def entry_of(cfg) -> Path | None:
    datamodule, scheme, weights = setup(cfg)
    return plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap).entry


def test_cached_and_uncached_losses_agree_to_fp16(tmp_path, small_fashion_mnist, teacher_file):
    # KD reads the logits, FitNets a feature map: both come from the cache.
    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "knowledge=[kd,fitnet]"))
    with open_dict(cfg):
        cfg.teacher_cache.enabled = True
    datamodule, scheme, weights = setup(cfg)
    _, outputs, views = built(cfg, datamodule, scheme, weights)
    logits = outputs.tables["logits"]
    assert logits.dtype == torch.float16 and len(logits) == N_TRAIN and views is None
    assert set(outputs.layers) == set(scheme.teacher_tap.layers) and outputs.layers

    batch = datamodule.train_set.dataset.__getitems__(list(range(0, 600, 7)))
    student = scheme.student_tap(batch["input"])
    uncached = scheme.loss_terms(student, scheme.sources(batch["input"], batch), batch)
    scheme.use_teacher_outputs(outputs)
    live = scheme.teacher_forward(batch["input"])
    served = scheme.sources(batch["input"], batch)
    torch.testing.assert_close(served.logits, live.logits, rtol=2e-3, atol=2e-3)
    cached = scheme.loss_terms(student, served, batch)
    assert set(cached) == {"task", "kd", "fitnet"}
    for name in cached:
        torch.testing.assert_close(cached[name], uncached[name], rtol=5e-3, atol=1e-4)


def test_a_run_serves_the_teacher_from_the_cache(tmp_path, small_fashion_mnist, teacher_file, monkeypatch):
    stages = []
    forward = Offline.teacher_forward

    def spy(self, x):  # records whether the teacher ran although its outputs were being served
        stages.append("despite the cache" if self.teacher_outputs is not None else "before serving")
        return forward(self, x)

    monkeypatch.setattr(Offline, "teacher_forward", spy)
    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true"))
    results = train(cfg)
    entries = list((tmp_path / "cache").glob(f"*/{MARKER}"))
    assert len(entries) == 1
    # Training and validation batches came from the cache: the teacher ran only to build the
    # scheme (its dry forward) and the cache itself (600 samples in batches of 32).
    assert stages == ["before serving"] * (1 + -(-N_TRAIN // 32))
    assert 0 <= results["metrics"]["val/student/agreement"] <= 1

    # A second run (another output dir) finds the entry and uses it without a rebuild.
    built = entries[0].stat().st_mtime_ns
    cfg2 = compose_config(
        [
            *overrides(tmp_path / "second", small_fashion_mnist, teacher_file),
            f"teacher_cache.dir={tmp_path / 'cache'}",
        ]
    )
    stages.clear()
    train(cfg2)
    # Not rebuilt: the teacher ran for the scheme's dry forward alone.
    assert stages == ["before serving"] and entries[0].stat().st_mtime_ns == built


def test_teacher_data_and_transform_changes_make_a_new_entry(tmp_path, small_fashion_mnist, teacher_file):
    base = overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true")
    cfg = compose_config(base)
    entry = entry_of(cfg)
    assert entry is not None and entry == entry_of(compose_config(base))
    # Nor do the split, batch size or location of the data change a sample's outputs.
    assert entry == entry_of(compose_config([*base, "data.val_size=50", "data.batch_size=16"]))

    # Another teacher (other weights, same architecture).
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(
        {"state_dict": create_model("deepnn", num_classes=10, in_channels=1, input_size=28).state_dict()},
        other,
    )
    assert entry_of(compose_config([*base, f"teacher.checkpoint={other}"])) != entry

    # Other data: the same file names, one pixel changed.
    changed = tmp_path / "changed"
    for path in small_fashion_mnist.iterdir():
        (changed / path.name).parent.mkdir(parents=True, exist_ok=True)
        (changed / path.name).write_bytes(path.read_bytes())
    images = read_idx(changed / "train-images-idx3-ubyte.gz", ndim=3).numpy().copy()
    images[0, 0, 0] ^= 1
    write_idx(changed / "train-images-idx3-ubyte", images, gz=True)
    assert entry_of(compose_config([*base, f"data.root={changed}"])) != entry

    # Another transform: the same datamodule with a different train pipeline.
    datamodule, scheme, weights = setup(cfg)
    datamodule.train_transform.transforms[-1].mean = [0.5]
    assert plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap).entry != entry

    # Other tapped layers (FitNets reads a feature map KD does not).
    assert entry_of(compose_config([*base, "knowledge=[kd,fitnet]"])) != entry


def test_a_killed_build_leaves_nothing_that_is_used(tmp_path, small_fashion_mnist, teacher_file, monkeypatch):
    import kdlab.teacher_cache.build as building

    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true"))
    datamodule, scheme, weights = setup(cfg)
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    entry = cache.entry
    real_outputs = building._outputs

    def killed_halfway(*args):  # the teacher's pass stops after its first batch
        for i, item in enumerate(real_outputs(*args)):
            if i == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(building, "_outputs", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        load_or_build(entry, cache.layout, scheme.teacher_forward, datamodule, torch.device("cpu"), 128)
    assert not entry.exists()  # an interrupted build leaves no entry at all

    # What a SIGKILL leaves (half-written tables under temporary names, no marker) is not mistaken
    # for an entry, and is cleared before the build.
    entry.mkdir()
    (entry / ".logits.bin.99999.tmp").write_bytes(b"half a table")
    (entry / "logits.bin").write_bytes(b"renamed, but no marker")
    monkeypatch.setattr(building, "_outputs", real_outputs)
    outputs, _ = load_or_build(
        entry, cache.layout, scheme.teacher_forward, datamodule, torch.device("cpu"), 128
    )
    assert len(outputs.tables["logits"]) == N_TRAIN and not list(entry.glob(".*.tmp"))
    expected = scheme.teacher_forward(datamodule.train_set.dataset.__getitems__([3, 5])["input"]).logits
    torch.testing.assert_close(outputs.lookup(torch.tensor([3, 5])).logits, expected, rtol=2e-3, atol=2e-3)


def test_a_full_disk_stops_the_build_with_what_to_do(
    tmp_path, small_fashion_mnist, teacher_file, monkeypatch
):
    """The tables' space is reserved before the teacher runs: a full disk is a clear error, not a SIGBUS
    when a write into the mapped file finds no block, and the half-made entry is removed."""
    import errno
    import os

    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true"))
    datamodule, scheme, weights = setup(cfg)
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(
        KdlabError,
        match=r"needs [\d.,]+ MB more .*\(teacher_cache.dir=<folder>\).*\(teacher_cache.enabled=false\)",
    ):
        load_or_build(cache.entry, cache.layout, scheme.teacher_forward, datamodule, torch.device("cpu"), 128)
    assert not cache.entry.exists() or not any(cache.entry.iterdir())


def test_a_damaged_entry_is_reported_with_what_to_do(tmp_path, small_fashion_mnist, teacher_file):
    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true"))
    datamodule, scheme, weights = setup(cfg)
    cache, _, _ = built(cfg, datamodule, scheme, weights)
    with (cache.entry / "logits.bin").open("r+b") as file:
        file.truncate(100)
    with pytest.raises(KdlabError, match=r"cannot be read \(logits.bin holds 100 bytes.* Delete the folder"):
        built(cfg, datamodule, scheme, weights)
    (cache.entry / MARKER).write_text("not json")
    with pytest.raises(KdlabError, match=r"cannot be read .* Delete the folder .* and rerun"):
        built(cfg, datamodule, scheme, weights)


def test_unreplayable_augmentation_is_refused_naming_the_transform(
    tmp_path, small_fashion_mnist, teacher_file, caplog
):
    rotated = [
        *(o for o in overrides(tmp_path, small_fashion_mnist, teacher_file) if "train_transforms" not in o),
        "data.train_transforms=[{_target_: torchvision.transforms.v2.RandomCrop, size: 28, padding: 2},"
        "{_target_: torchvision.transforms.v2.RandomRotation, degrees: 10},"
        "{_target_: torchvision.transforms.v2.ColorJitter, brightness: 0.2}]",
    ]
    cfg = compose_config(rotated)
    datamodule, scheme, weights = setup(cfg)
    with caplog.at_level(logging.INFO, logger="kdlab.teacher_cache"):
        assert cache_callback(cfg, scheme, datamodule, weights, cfg.teacher) is None
    [line] = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert "the training augmentation RandomRotation, ColorJitter cannot be stored and replayed" in line
    with open_dict(cfg):
        cfg.teacher_cache.enabled = True
    with pytest.raises(KdlabError, match="teacher_cache.enabled=true, but .* RandomRotation, ColorJitter"):
        cache_callback(cfg, scheme, datamodule, weights, cfg.teacher)


def test_budget_and_cost_decide_what_auto_does(tmp_path, small_fashion_mnist, teacher_file):
    # Over budget: refused with the size needed.
    cfg = compose_config(
        overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.max_bytes=1000")
    )
    datamodule, scheme, weights = setup(cfg)
    refused = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    assert not refused.usable and "teacher_cache.max_bytes" in refused.reason
    # Logits that fit, with features that do not: the features are left to the live teacher.
    fitnet = compose_config(
        overrides(
            tmp_path,
            small_fashion_mnist,
            teacher_file,
            "knowledge=[kd,fitnet]",
            "teacher_cache.max_bytes=20000",
            "teacher_cache.enabled=true",
        )
    )
    _, fitnet_scheme, _ = setup(fitnet)
    partial = plan(fitnet, fitnet.teacher, datamodule, weights, fitnet_scheme.teacher_tap)
    assert partial.usable and partial.live_layers == tuple(fitnet_scheme.teacher_tap.layers)
    assert partial.layout.feats == {}

    # A 4-batch run would not pay for a build over 600 samples, so auto leaves it unbuilt ...
    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file))
    short = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    assert not short.usable and "teacher_cache.enabled=true" in short.reason
    assert "the next run of this setting builds it" in short.reason
    # ... the same run resumed in place is still that run, and does not build it either ...
    assert not plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap).usable
    # ... but another run of the same setting is taken as a sign of more to come: that run builds it.
    again = compose_config(
        [*overrides(tmp_path, small_fashion_mnist, teacher_file), f"paths.output_dir={tmp_path / 'again'}"]
    )
    assert plan(again, again.teacher, datamodule, weights, scheme.teacher_tap).usable
    # ... two full epochs would ...
    full = compose_config(
        overrides(
            tmp_path,
            small_fashion_mnist,
            teacher_file,
            "trainer.limit_train_batches=null",
            "trainer.max_epochs=2",
        )
    )
    assert plan(full, full.teacher, datamodule, weights, scheme.teacher_tap).usable
    # ... and once the entry exists, even a short run uses it.
    cache, _, _ = built(full, datamodule, scheme, weights)
    assert plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap).entry == cache.entry

    with open_dict(cfg):
        cfg.teacher_cache.enabled = "sometimes"
    with pytest.raises(KdlabError, match="teacher_cache.enabled='sometimes' is not a choice"):
        plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)


def test_the_callback_hands_the_outputs_to_the_scheme(tmp_path, small_fashion_mnist, teacher_file):
    cfg = compose_config(overrides(tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=true"))
    datamodule, scheme, weights = setup(cfg)
    callback = cache_callback(cfg, scheme, datamodule, weights, cfg.teacher)
    assert isinstance(callback, TeacherCache)

    class FakeTrainer:  # what on_fit_start reads of the trainer
        pass

    trainer = FakeTrainer()
    trainer.datamodule = datamodule
    callback.on_fit_start(trainer, scheme)
    assert scheme.teacher_outputs is not None and scheme.cache_covers_validation
    assert len(scheme.teacher_outputs.tables["logits"]) == N_TRAIN
