"""The teacher-output cache on augmented data: stored views, replayed exactly (kdlab/teacher_cache/).

On a small copy of real Fashion-MNIST (tests/test_teacher_cache.py's fixtures) with its usual
augmentation, RandomCrop(28, padding=2) + horizontal flip: 50 possible views of each image.
"""

# ruff: noqa: F811  (the fixtures imported from tests/test_teacher_cache.py are arguments here)
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from kdlab.data.replay import ReplayedViews, ReplayPipeline, draw_views
from kdlab.errors import KdlabError
from kdlab.run import train
from kdlab.schemes import Offline
from kdlab.teacher_cache import (
    MARKER,
    TeacherCache,
    decode_logits,
    encode_logits,
    plan,
    read_entry,
)
from kdlab.teacher_cache.tables import TableWriter
from tests.conftest import compose_config
from tests.test_teacher_cache import N_TRAIN, built, setup, small_fashion_mnist, teacher_file  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def augmented(tmp_path: Path, data_root: Path, teacher: Path, *extra: str) -> list[str]:
    from tests.test_teacher_cache import overrides

    plain = overrides(tmp_path, data_root, teacher)
    return [o for o in plain if "train_transforms" not in o] + ["teacher_cache.enabled=true", *extra]


# -- replay ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_of_replayed_views_is_bit_identical_to_what_the_transforms_made(seed):
    """Each image of a batch, made at once, equals the transform's own output for its parameters."""
    images = torch.randint(
        0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    steps = [
        v2.Pad(2, padding_mode="reflect"),
        v2.RandomCrop(32, padding=4, padding_mode="edge"),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(p=0.3),
    ]
    pipeline = ReplayPipeline(steps)
    params = draw_views(pipeline, images, 2, seed=seed)
    for k in range(2):
        batch = pipeline.apply_batch(images, params[:, k])
        for i, image in enumerate(images):
            # What the transforms themselves make when their own draws give these parameters.
            top, left, hflip, vflip = params[i, k].tolist()
            made = v2.functional.pad(image, [2], padding_mode="reflect")
            made = v2.functional.pad(made, [4], padding_mode="edge")
            made = v2.functional.crop(made, top, left, 32, 32)
            made = made.flip(-1) if hflip else made
            made = made.flip(-2) if vflip else made
            assert torch.equal(batch[i], made) and torch.equal(pipeline.apply(image, params[i, k]), made)


def test_views_spread_over_epochs_without_the_runs_seed():
    images = torch.randint(
        0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    pipeline = ReplayPipeline([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    every = pipeline.choices(images[0])
    tail = v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    spread = ReplayedViews(images, torch.zeros(40), pipeline, every, tail, spread="random", seed=3)
    index = torch.arange(40)
    torch.manual_seed(1)
    first = spread.views_of(index).clone()
    torch.manual_seed(2)  # another run's seed
    spread._drawn = None
    assert torch.equal(spread.views_of(index), first)
    spread.set_epoch(1)
    assert not torch.equal(spread.views_of(index), first)  # a fresh draw each epoch
    batch = spread.__getitems__([0, 5, 7])
    for row, i in enumerate((0, 5, 7)):
        view = int(batch["view"][row])
        assert torch.equal(batch["input"][row], tail(pipeline.apply(images[i], every[view])))


# -- storage ----------------------------------------------------------------------------------------


def test_topk_storage_keeps_the_top_probabilities_and_the_tails_mass():
    logits = torch.tensor([[7.0, 5.0, 2.0, 0.0, -4.0], [0.5, -1.0, 3.0, 2.5, 0.0]])
    stored = encode_logits(logits, "topk", 2)
    decoded = decode_logits(stored, "topk", 5, torch.float32)
    # By hand, row 0: the top-2 logits stay 7 and 5; the other three share one logit, the log of
    # their mean exp: log((e^2 + e^0 + e^-4) / 3).
    fill = torch.log(torch.tensor((2.0**0 * torch.e**2 + 1 + torch.e**-4) / 3))
    torch.testing.assert_close(decoded[0], torch.tensor([7.0, 5.0, fill, fill, fill]), rtol=1e-3, atol=1e-3)
    p, q = logits.softmax(1), decoded.softmax(1)
    top = logits.topk(2, dim=1).indices
    torch.testing.assert_close(q.gather(1, top), p.gather(1, top), rtol=2e-3, atol=1e-3)
    tail = lambda probs: 1 - probs.gather(1, top).sum(1)  # noqa: E731
    torch.testing.assert_close(tail(q), tail(p), rtol=5e-3, atol=1e-3)
    assert stored["topk_index"].dtype == torch.int16 and stored["topk_values"].dtype == torch.float16
    # fp16: every logit, half precision.
    torch.testing.assert_close(
        decode_logits(encode_logits(logits, "fp16", None), "fp16", 5, torch.float32), logits
    )


def test_an_entry_is_memory_mapped_not_read_into_memory(tmp_path):
    """A 400 MB table opens without its pages being read: entries may be larger than memory."""
    entry = tmp_path / "entry"
    entry.mkdir()
    writer = TableWriter(entry)
    table = writer.create("logits", (20_000_000, 10), torch.float16)
    table[7] = 1.5
    writer.finish({"samples": 20_000_000})

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    before = resident_mb()
    _, tables = read_entry(entry)
    assert resident_mb() - before < 50
    assert torch.equal(tables["logits"][7], torch.full((10,), 1.5, dtype=torch.float16))
    assert tables["logits"].shape == (20_000_000, 10)


# -- plan: K, key, refusals ------------------------------------------------------------------------


def test_k_follows_the_epochs_the_finite_views_and_the_budget(tmp_path, small_fashion_mnist, teacher_file):
    def planned(*extra):
        cfg = compose_config(augmented(tmp_path, small_fashion_mnist, teacher_file, *extra))
        datamodule, scheme, weights = setup(cfg)
        return plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)

    # auto: one view per planned epoch, drawn per sample ...
    views = planned("trainer.max_epochs=3").layout.views
    assert (views.count, views.kind, views.spread) == (3, "drawn", "cycle")
    # ... or, when the epochs cover them, all (2*2+1)^2 * 2 = 50 views, spread at random.
    views = planned("trainer.max_epochs=60").layout.views
    assert (views.count, views.kind, views.spread) == (50, "all", "random")
    assert planned("teacher_cache.views=7").layout.views.count == 7
    assert planned("teacher_cache.views=80").layout.views.kind == "all"
    # The budget caps K: 10 fp16 logits are 20 bytes per view and sample.
    assert (
        planned("teacher_cache.views=8", f"teacher_cache.max_bytes={N_TRAIN * 20 * 5}").layout.views.count
        == 5
    )
    # top-k: 3 values, 3 int16 classes and a fill logit are 14 bytes.
    capped = planned(
        "teacher_cache.views=8",
        "teacher_cache.logits=topk",
        "teacher_cache.topk=3",
        f"teacher_cache.max_bytes={N_TRAIN * 14 * 6}",
    )
    assert capped.layout.views.count == 6 and capped.layout.codec == "topk"

    with pytest.raises(KdlabError, match=r"teacher_cache.views='many' is not a choice"):
        planned("teacher_cache.views=many")
    with pytest.raises(
        KdlabError, match=r"teacher_cache.topk=10 keeps every one of the teacher's 10 classes"
    ):
        planned("teacher_cache.logits=topk", "teacher_cache.topk=10")
    with pytest.raises(KdlabError, match=r"teacher_cache.logits='bf16' is not a choice"):
        planned("teacher_cache.logits=bf16")
    with pytest.raises(KdlabError, match=r"teacher_cache.views=all .* draws from a continuous range"):
        planned(
            "teacher_cache.views=all",
            "data.train_transforms=[{_target_: torchvision.transforms.v2.RandomResizedCrop, size: 28}]",
        )


def test_a_new_entry_for_another_augmentation_k_teacher_or_layers(
    tmp_path, small_fashion_mnist, teacher_file
):
    def entry(*extra):
        cfg = compose_config(
            augmented(tmp_path, small_fashion_mnist, teacher_file, "trainer.max_epochs=2", *extra)
        )
        datamodule, scheme, weights = setup(cfg)
        return plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap).entry

    base = entry()
    # Not the run's seed, the knowledge's settings or the split: all of those read the same numbers.
    assert entry("seed=7", "knowledge.kd.temperature=2", "data.val_size=50") == base
    others = [
        entry("trainer.max_epochs=3"),  # K
        entry("teacher_cache.views=2", "teacher_cache.view_seed=1"),  # other views
        entry(
            "data.train_transforms=[{_target_: torchvision.transforms.v2.RandomCrop, size: 28, padding: 3}]"
        ),
        entry("teacher_cache.logits=topk"),
        entry("knowledge=[kd,fitnet]"),  # tapped layers
        entry("model@teacher=lightnn", "teacher.checkpoint=null"),
    ]
    assert len({base, *others}) == 1 + len(others)


# -- training from stored views ---------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["fp16", "topk"])
def test_cached_and_live_teacher_losses_agree_on_the_same_views(
    tmp_path, small_fashion_mnist, teacher_file, storage
):
    cfg = compose_config(
        augmented(
            tmp_path,
            small_fashion_mnist,
            teacher_file,
            "trainer.max_epochs=3",
            f"teacher_cache.logits={storage}",
            "teacher_cache.topk=5",
            "knowledge=[kd,fitnet]",
            "teacher_cache.max_bytes=80000",  # the logits fit, FitNets' features do not: they run live
        )
    )
    datamodule, scheme, weights = setup(cfg)
    cache, outputs, views = built(cfg, datamodule, scheme, weights)
    assert outputs.views == 3 and cache.live_layers and outputs.layers == []
    outputs.live_layers = cache.live_layers
    for epoch in (0, 1, 4):
        views.set_epoch(epoch)
        batch = views.__getitems__(list(range(0, N_TRAIN, 5)))
        assert torch.equal(batch["view"], (batch["index"] + epoch) % 3)
        student = scheme.student_tap(batch["input"])
        scheme.use_teacher_outputs(None)
        live = scheme.sources(batch["input"], batch)  # the teacher, run on the replayed images
        uncached = scheme.loss_terms(student, live, batch)
        scheme.use_teacher_outputs(outputs)
        served = scheme.sources(batch["input"], batch)
        cached = scheme.loss_terms(student, served, batch)
        if storage == "fp16":
            torch.testing.assert_close(served.logits, live.logits, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(cached["kd"], uncached["kd"], rtol=5e-3, atol=1e-4)
        else:  # the top-5 of 10 classes, and one logit for the rest
            top = live.logits.topk(5, dim=1).indices
            torch.testing.assert_close(
                served.logits.gather(1, top), live.logits.gather(1, top), rtol=2e-3, atol=2e-3
            )
            torch.testing.assert_close(cached["kd"], uncached["kd"], rtol=0.1, atol=2e-3)
        torch.testing.assert_close(cached["fitnet"], uncached["fitnet"])  # live features: the same


def test_a_run_trains_from_stored_views_and_a_second_run_never_runs_the_teacher(
    tmp_path, small_fashion_mnist, teacher_file, monkeypatch, caplog
):
    calls = []
    forward = Offline.teacher_forward

    def spy(self, x):
        trainer = self._trainer  # None while the scheme is being built
        # In a training step once the outputs are served (the build runs before they are).
        serving = trainer is not None and trainer.training and self.teacher_outputs is not None
        calls.append("training" if serving else "other")
        return forward(self, x)

    monkeypatch.setattr(Offline, "teacher_forward", spy)
    served_epochs = []
    monkeypatch.setattr(
        TeacherCache,
        "on_train_epoch_end",
        lambda self, trainer, module: served_epochs.append(int(self.views.epoch)),
        raising=False,
    )
    args = augmented(
        tmp_path, small_fashion_mnist, teacher_file, "teacher_cache.enabled=auto", "trainer.max_epochs=2"
    )
    with caplog.at_level(logging.INFO):
        first = train(compose_config(args))
    assert "the next run of this setting builds it" in caplog.text  # a short first run does not build
    assert not list((tmp_path / "cache").glob(f"*/{MARKER}"))
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.INFO):
        second = train(compose_config([*args, f"paths.output_dir={tmp_path / 'second'}"]))
    assert "Teacher logits of 2 stored views per sample served from the cache" in caplog.text
    assert "training" not in calls and served_epochs[-2:] == [0, 1]
    assert len(list((tmp_path / "cache").glob(f"*/{MARKER}"))) == 1
    assert 0 <= second["metrics"]["test/student/top1"] <= 1 and first["metrics"]


# -- sharing ----------------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdlab.run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_sweep_jobs_and_ddp_ranks_share_one_build(tmp_path, small_fashion_mnist, teacher_file):
    made = augmented(tmp_path, small_fashion_mnist, teacher_file, "trainer.max_epochs=2", "logger=none")
    # Each job in its own Hydra run dir (its run.log there), all with one cache.
    common = [o for o in made if not o.startswith("paths.output_dir")] + [
        f"teacher_cache.dir={tmp_path / 'cache'}"
    ]
    jobs = [
        run_cli([*common, f"hydra.run.dir={tmp_path / name}", f"seed={seed}"], tmp_path)
        for name, seed in (("a", 1), ("b", 2))
    ]
    done = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in done]
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    builds = sum("Caching teacher outputs on 2 stored views" in err for _, err in done)
    assert builds == 1  # the other job waited for it and read it
    logs = [(tmp_path / name / "run.log").read_text() for name in ("a", "b")]
    assert (
        sum("Waiting for another process that is computing the teacher's outputs" in log for log in logs) == 1
    )
    assert all(f"served from the cache {entry}" in log for log in logs)

    ddp = run_cli(
        [
            *common,
            f"hydra.run.dir={tmp_path / 'ddp'}",
            "trainer.accelerator=cpu",
            "trainer.strategy=ddp_spawn",
            "trainer.devices=2",
            "teacher_cache.views=3",
        ],
        tmp_path,
    )
    _, err = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, err[-3000:]
    # One progress bar started (at 0%) over both ranks: one build.
    assert len(re.findall(r"Caching teacher outputs on 3 stored views:\s+0%", err)) == 1
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_the_sampler_lightning_uses_under_ddp_still_gets_each_epochs_views():
    """DistributedSampler does not pass the epoch on; the cache's callback sets it on the views."""
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    pipeline = ReplayPipeline([v2.RandomCrop(28, padding=2)])
    params = draw_views(pipeline, images, 3)
    views = ReplayedViews(images, torch.zeros(12), pipeline, params, v2.ToDtype(torch.float32, scale=True))
    from kdlab.data.datasets import collate

    sampler = torch.utils.data.DistributedSampler(views, num_replicas=2, rank=1, seed=0)
    loader = torch.utils.data.DataLoader(
        views, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True, collate_fn=collate
    )
    callback = TeacherCache(Path("unused"), layout=None)
    callback.views = views

    class Trainer:
        current_epoch = 0

    for epoch in range(3):
        sampler.set_epoch(epoch)
        Trainer.current_epoch = epoch
        callback.on_train_epoch_start(Trainer, None)
        for batch in loader:
            assert torch.equal(batch["view"], (batch["index"] + epoch) % 3)


def test_the_accuracy_script_runs_every_arm_and_writes_its_table(tmp_path, small_fashion_mnist):
    """scripts/cache_accuracy.sh (the README's table) on the small data, one seed, a tiny budget."""
    tiny = [
        f"data.root={small_fashion_mnist}",
        "data.val_size=100",
        "data.batch_size=32",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "++teacher_training.trainer.limit_train_batches=2",
        "trainer.enable_model_summary=false",
    ]
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cache_accuracy.sh"), str(out), *tiny],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "summary.md").read_text()
    # The baseline, the live teacher and the four stored-view arms: one row each.
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in row.strip("|").split("|")] for row in table.splitlines()[2:]]
    arms = {tuple(row[1:4]) for row in rows}
    assert rows[0][0] == "baseline (student alone)" and ("False", "default", "default") in arms
    assert {("True", views, storage) for views in ("5", "2") for storage in ("fp16", "topk")} <= arms
    assert len(rows) == 6 and all(row[header.index("n")] == "1" for row in rows)  # one seed each
    entries = [p for p in (out / "store" / "outputs").iterdir() if p.is_dir()]
    assert len(entries) == 4  # K x storage; the seeds and the live arm add none


def test_image_folder_views_are_drawn_per_image_size_and_replayed_from_the_files(tmp_path):
    """ImageFolder (files of many sizes, RandomResizedCrop + flip): each image's own views, replayed."""
    from kdlab.data import ImageFolderDataModule
    from tests.test_data import write_imagefolder

    datamodule = ImageFolderDataModule(
        root=str(write_imagefolder(tmp_path / "tree")), num_classes=3, input_size=16, val_size=2
    )
    datamodule.setup("fit")
    pipeline = datamodule.replay_pipeline()
    images = datamodule.replay_images()
    params = draw_views(pipeline, images, 3, seed=0)
    assert params.shape == (12, 3, 5) and pipeline.choices(images[0]) is None
    views = datamodule.stored_views(pipeline, params, "cycle", 0)
    normalise = v2.Normalize(datamodule.mean, datamodule.std)
    for i in (0, 5, 11):
        top, left, height, width, flip = params[i, 1].tolist()
        assert 0 < height <= images[i].shape[-2] and 0 < width <= images[i].shape[-1]
        made = v2.functional.resized_crop(images[i], top, left, height, width, [16, 16], antialias=True)
        made = made.flip(-1) if flip else made
        expected = normalise(v2.functional.to_dtype(made, torch.float32, scale=True))
        replayed = views.make(torch.tensor([i]), torch.tensor([1]))[0]
        assert torch.equal(replayed, expected)


def test_the_sweep_a_job_belongs_to_is_counted_from_its_multirun_record(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from kdlab.teacher_cache import sweep_jobs

    assert sweep_jobs() == 1  # outside Hydra
    record = {
        "hydra": {"overrides": {"task": ["knowledge=kd,dkd,dist", "seed=range(1,4)", "trainer.max_epochs=2"]}}
    }
    OmegaConf.save(OmegaConf.create(record), tmp_path / "multirun.yaml")
    hydra = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)}}})
    instance = HydraConfig.instance()
    before = instance.cfg
    try:
        instance.cfg = hydra
        assert sweep_jobs() == 9  # 3 methods x 3 seeds
    finally:
        instance.cfg = before
