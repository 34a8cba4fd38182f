"""Tests for the speed paths: batched fetch and precomputed inputs, the channels_last teacher,
glibc malloc tuning, the NVML probe, and that scripts/bench.py runs and reports every figure.

These check that each fast path gives the same numbers as the plain one; how fast they are is
measured by scripts/bench.py, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab import allocator, cuda_probe
from kdlab.build import build_knowledge, build_model, build_scheme, instantiate
from kdlab.data import FashionMNISTDataModule
from kdlab.data.datasets import IndexedDataset, TensorBatchDataset
from kdlab.errors import KdlabError
from tests.conftest import ROOT, compose_config, fast_overrides
from tests.test_teacher_cache import small_fashion_mnist  # noqa: F401  (a fixture)


def module(root: Path, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(root=str(root), val_size=100, batch_size=64, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def batches(loader) -> dict[str, torch.Tensor]:
    parts = list(loader)
    return {key: torch.cat([b[key] for b in parts]) for key in ("input", "target", "index")}


@pytest.mark.parametrize("precompute", [True, False])
def test_batched_fetch_gives_the_per_sample_batches(small_fashion_mnist, precompute):  # noqa: F811
    fast = module(small_fashion_mnist, train_transforms=[], precompute_inputs=precompute)
    assert isinstance(fast.train_set.dataset, TensorBatchDataset)
    assert isinstance(fast.test_set, TensorBatchDataset)
    assert (fast.train_set.dataset.transform is None) == precompute
    # The plain path: the same samples and transform, one item at a time, collated.
    plain = IndexedDataset(fast._train_samples, fast.train_set.dataset.targets, fast.train_transform)
    rows = [int(i) for i in torch.randperm(600)[:50]]
    batch = fast.train_set.dataset.__getitems__(rows)
    items = [plain[i] for i in rows]
    torch.testing.assert_close(
        batch["input"], torch.stack([item["input"] for item in items]), rtol=0, atol=1e-6
    )
    assert batch["index"].tolist() == rows and batch["target"].tolist() == [item["target"] for item in items]
    # Through the loaders: val and test hold what the eval transform makes of each indexed image.
    for split, loader in (("val", fast.val_dataloader()), ("test", fast.test_dataloader())):
        got = batches(loader)
        source = fast._train_samples.tensors[0] if split == "val" else fast.test_set.base.tensors[0]
        if precompute and split == "test":
            source = None  # the test tensor is already transformed; compare with the raw files below
        if source is not None:
            expected = fast.eval_transform(source[got["index"]])
            torch.testing.assert_close(got["input"], expected, rtol=0, atol=1e-6)
    # Precomputed or not, the test batches are the same.
    other = module(small_fashion_mnist, train_transforms=[], precompute_inputs=not precompute)
    torch.testing.assert_close(
        batches(fast.test_dataloader())["input"], batches(other.test_dataloader())["input"]
    )


def test_augmented_training_keeps_the_per_sample_path(small_fashion_mnist):  # noqa: F811
    dm = module(small_fashion_mnist)  # the usual augmentation: a random crop and flip per image
    assert type(dm.train_set.dataset) is IndexedDataset and dm.train_transform_is_random
    assert isinstance(dm.val_set.dataset, TensorBatchDataset)  # validation is never augmented
    train = next(iter(dm.train_dataloader()))
    assert train["input"].shape == (64, 1, 28, 28) and train["index"].dtype == torch.int64


def test_precompute_inputs_must_be_a_choice(small_fashion_mnist):  # noqa: F811
    with pytest.raises(KdlabError, match="data.precompute_inputs='yes' is not a choice"):
        FashionMNISTDataModule(root=str(small_fashion_mnist), precompute_inputs="yes")


def test_channels_last_teacher_gives_the_same_outputs(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "knowledge=[kd,at]"])
    datamodule = instantiate(cfg.data)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher)
    plain = build_scheme(cfg, datamodule, build_knowledge(cfg), teacher=teacher, teacher_channels_last=False)
    fast = build_scheme(
        cfg, datamodule, build_knowledge(cfg), teacher=_copy(cfg, teacher), teacher_channels_last=True
    )
    assert fast.teacher.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.teacher.features[0].weight.is_contiguous()
    x = torch.randn(16, 1, 28, 28)
    a, b = plain.teacher_forward(x), fast.teacher_forward(x)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    assert b.feats.keys() == a.feats.keys() and b.feats
    for name in a.feats:
        torch.testing.assert_close(b.feats[name], a.feats[name], rtol=1e-4, atol=1e-5)


def _copy(cfg, model: torch.nn.Module) -> torch.nn.Module:
    twin = build_model(cfg.teacher)
    twin.load_state_dict(model.state_dict())
    return twin


def test_malloc_tuning_applies_on_glibc_unless_the_user_chose(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    if allocator.glibc() is None:
        assert allocator.tune_malloc() is False
        return
    assert allocator.tune_malloc() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")
    assert allocator.user_chose_allocator() == "MALLOC_ARENA_MAX_" and allocator.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.tune_malloc() is False


def test_nvml_probe_is_dropped_only_where_nvml_cannot_load(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setenv(cuda_probe.VARIABLE, "1")
    monkeypatch.setattr(cuda_probe.ctypes, "CDLL", missing)
    assert cuda_probe.drop_failing_nvml_probe() is True
    assert cuda_probe.VARIABLE not in os.environ
    assert torch.cuda.is_available() in (True, False)  # torch's own check still answers
    # Where NVML loads (a GPU machine), or the variable is not set, nothing changes.
    monkeypatch.setenv(cuda_probe.VARIABLE, "1")
    monkeypatch.setattr(cuda_probe.ctypes, "CDLL", lambda name: object())
    assert cuda_probe.drop_failing_nvml_probe() is False
    assert os.environ[cuda_probe.VARIABLE] == "1"
    monkeypatch.delenv(cuda_probe.VARIABLE)
    assert cuda_probe.drop_failing_nvml_probe() is False


def test_bench_runs_and_reports_every_figure(tmp_path, small_fashion_mnist):  # noqa: F811
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--batches", "2", "--warmup", "1"]
    cmd += ["--repeats", "1", "--cpu", "--data-root", str(small_fashion_mnist), "--val-size", "100"]
    cmd += ["--batch-size", "32", "--workdir", str(tmp_path / "work"), "--json", str(out), "--allocator"]
    # bf16 autocast runs on the CPU too: the GPU check's second precision, exercised here.
    cmd += ["--precision", "bf16-mixed"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["settings"]["precision"] == "bf16-mixed"
    assert len(figures["img_per_s"]) == 13 and all(rate > 0 for rate in figures["img_per_s"].values())
    assert set(figures["ratios"]) == {
        "b/a",
        "c/d",
        "c/b",
        "e/(ce_t+ce_s)",
        "channels_last",
        "kdlab_baseline/d",
        "f/g",
        "f/b_aug",
        "f/g_views",
    }
    assert figures["cache_build_s"] > 0 and set(figures["allocator_a_img_per_s"]) == {"default", "tuned"}
    views = figures["stored_views"]
    assert views["views"] == 2 and views["build_s"] > 0 and views["build_img_per_s"] > 0
    assert "| b/a | offline KD vs hand-written KD |" in result.stdout
    assert "| f/g | cached KD on stored views vs CE with live augmentation |" in result.stdout


def test_compiled_teacher_gives_the_same_outputs_and_features(tmp_path):
    # The eager backend checks the wiring (hooks traced, outputs and features kept) without the
    # minutes a CPU inductor build takes; the default backend is what a GPU user gets.
    cfg = compose_config(
        [*fast_overrides(tmp_path), "knowledge=[kd,at]", "mode.teacher_compile={backend: eager}"]
    )
    datamodule = instantiate(cfg.data)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher)
    plain = build_scheme(
        cfg, datamodule, build_knowledge(cfg), teacher=_copy(cfg, teacher), teacher_compile=None
    )
    compiled = build_scheme(cfg, datamodule, build_knowledge(cfg), teacher=teacher)
    assert compiled.teacher._compiled_call_impl is not None and plain.teacher._compiled_call_impl is None
    assert compiled.teacher.state_dict().keys() == plain.teacher.state_dict().keys()
    x = torch.randn(8, 1, 28, 28)
    a, b = plain.teacher_forward(x), compiled.teacher_forward(x)
    torch.testing.assert_close(b.logits, a.logits)
    assert b.feats.keys() == a.feats.keys() and b.feats
    for name in a.feats:
        torch.testing.assert_close(b.feats[name], a.feats[name])


def test_unknown_compile_arguments_are_refused_with_what_to_set(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "mode.teacher_compile={fastest: true}"])
    with pytest.raises(
        KdlabError, match=r"mode.teacher_compile=\{'fastest': True\} is not a set of torch.compile"
    ):
        build_scheme(cfg, instantiate(cfg.data), build_knowledge(cfg), teacher=build_model(cfg.teacher))


def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    """README's `bash scripts/gpu_check.sh`: on a machine without CUDA it measures nothing and says why."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the check would run for minutes")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no CUDA GPU is visible" in result.stderr
    assert "figures are GPU figures only" in result.stderr
    assert not (tmp_path / "out" / "gpu_check.md").exists()
