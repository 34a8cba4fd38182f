"""kdlab.efficiency: FLOPs against a count by hand, the weights' size against the file torch.save
writes, the latency's passes, the student / teacher ratios, and how the results table shows them."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from kdlab.efficiency import (
    deployed_copy,
    flops_per_image,
    latency_ms,
    measure_models,
    ratio_line,
    weights_bytes,
)
from kdlab.models.tutorial import DeepNN, LightNN
from kdlab.report import format_table, model_rows
from kdlab.taps import FeatureTap

SHAPE = (1, 28, 28)  # Fashion-MNIST


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    assert flops_per_image(nn.Linear(10, 20), (10,)) == 2 * 10 * 20  # the bias counts nothing


def test_flops_of_a_small_cnn_equal_the_count_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    # The conv: 8 output channels at 8x8 positions, each a 3x3x3 window; the linear layer 128 x 10.
    conv = 8 * 8 * 8 * (3 * 3 * 3)
    linear = 8 * 4 * 4 * 10
    assert flops_per_image(model, (3, 8, 8)) == 2 * (conv + linear)


def test_flops_of_the_default_pair():
    # DeepNN at 1x28x28: four 3x3 convs (1->128, 128->64 at 28x28; 64->64, 64->32 at 14x14), then
    # 1568 -> 512 -> 10. LightNN: 1->16 at 28x28, 16->16 at 14x14, then 784 -> 256 -> 10.
    deep = 28 * 28 * 9 * (1 * 128 + 128 * 64) + 14 * 14 * 9 * (64 * 64 + 64 * 32) + 1568 * 512 + 512 * 10
    light = 28 * 28 * 9 * 16 + 14 * 14 * 9 * 16 * 16 + 784 * 256 + 256 * 10
    assert flops_per_image(DeepNN(10, 1, 28).eval(), SHAPE) == 2 * deep
    assert flops_per_image(LightNN(10, 1, 28).eval(), SHAPE) == 2 * light


def test_weights_size_is_the_size_of_the_file_torch_save_writes(tmp_path):
    model = LightNN(10, 1, 28)
    # torch stores the file's name (its stem) in the file once per record; a buffer's is "archive".
    path = tmp_path / "archive.pt"
    torch.save(model.state_dict(), path)
    assert weights_bytes(model) == path.stat().st_size
    other = tmp_path / "student.pt"
    torch.save(model.state_dict(), other)
    assert weights_bytes(model) == pytest.approx(other.stat().st_size, rel=1e-3)
    assert weights_bytes(model) > 4 * sum(p.numel() for p in model.parameters())  # float32, plus headers


class Sleeper(nn.Module):
    """A model whose forward pass takes `seconds`, counting its calls."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_is_the_median_of_the_timed_passes_after_the_warm_up():
    model = Sleeper(0.01)
    ms = latency_ms(model, SHAPE, 4, warmup=2, repeats=5, budget_s=10)
    assert model.calls == 7
    assert 10 <= ms < 100


def test_a_slow_model_gets_one_warm_up_and_three_timed_passes():
    model = Sleeper(0.02)
    assert latency_ms(model, SHAPE, 4, warmup=2, repeats=5, budget_s=0) >= 20
    assert model.calls == 4


def test_the_measured_copy_is_bare_and_the_model_is_left_as_it_was():
    teacher = DeepNN(10, 1, 28).to(memory_format=torch.channels_last).train()
    tap = FeatureTap(teacher, ["stage1"])
    copy = deployed_copy(teacher)
    assert not copy.training and all(not m._forward_hooks for m in copy.modules())
    assert copy.features[0].weight.is_contiguous()
    # The original keeps its tap, its mode and its layout, and its tap still works.
    assert teacher.training and teacher.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert tap(torch.zeros(2, *SHAPE)).feats["stage1"].shape == (2, 64, 14, 14)
    assert torch.equal(copy.features[0].weight, teacher.features[0].weight)


@pytest.fixture(scope="module")
def pair():
    models = {"teacher": DeepNN(10, 1, 28), "student": LightNN(10, 1, 28)}
    return models, measure_models(models, SHAPE, batch_size=8)


def test_every_figure_is_positive_and_the_ratios_are_student_over_teacher(pair):
    _, efficiency = pair
    assert efficiency["device"] == "cpu" and efficiency["batch_size"] == 8
    assert efficiency["input_shape"] == list(SHAPE)
    teacher, student = efficiency["models"]["teacher"], efficiency["models"]["student"]
    assert set(efficiency["ratio"]) == set(student) == set(teacher)
    for key, ratio in efficiency["ratio"].items():
        assert teacher[key] > 0 and student[key] > 0, key
        assert ratio == student[key] / teacher[key], key
    assert student["params"] == 206_010 and teacher["params"] == 938_922
    assert student["flops"] < teacher["flops"] and student["weights_bytes"] < teacher["weights_bytes"]


def test_no_ratio_without_a_teacher():
    efficiency = measure_models({"student": nn.Linear(4, 2)}, (4,), batch_size=2)
    assert efficiency["ratio"] is None and ratio_line(efficiency) is None


def test_the_table_shows_the_costs_and_the_line_under_it_the_ratios(pair):
    models, efficiency = pair
    metrics = {"test/teacher/top1": 0.9, "test/student/top1": 0.8, "test/student/agreement": 0.85}
    rows = model_rows(models, {"teacher": "deepnn", "student": "lightnn"}, metrics, ["ensemble"], efficiency)
    rows = {row["model"]: row for row in rows}
    assert rows["teacher"]["FLOPs"] == efficiency["models"]["teacher"]["flops"]
    assert rows["student"]["weights MB"] == efficiency["models"]["student"]["weights_bytes"] / 1e6
    assert rows["student"]["ms @ 1"] == efficiency["models"]["student"]["latency_ms_batch_1"]
    assert rows["student"]["ms @ batch"] == efficiency["models"]["student"]["latency_ms_training_batch"]
    assert all(rows["ensemble"][c] is None for c in ("FLOPs", "weights MB", "ms @ 1", "ms @ batch"))
    header = format_table(list(rows.values()), batch_size=8).splitlines()[0]
    assert header.split("|")[-5:-1] == [" FLOPs  ", " weights MB ", " ms @ 1 ", " ms @ 8 "]
    line, ratio = ratio_line(efficiency), efficiency["ratio"]
    assert line.startswith(f"Student / teacher: {ratio['params']:.2g}x parameters, {ratio['flops']:.2g}x")
    assert line.endswith("at batch 8 (measured on cpu).")
