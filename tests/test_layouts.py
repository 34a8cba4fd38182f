"""Token <-> map layouts (kdlab/knowledge/layouts.py), by hand on small tensors, and feature losses
between a ViT and a CNN in either direction through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge.layouts import prefix_tokens, tokens_to_map
from kdlab.models import create_model
from tests.conftest import NO_PLOTS, cli_overrides, run_main
from tests.test_models_timm import tiny_vit


def test_patch_tokens_become_their_grid_in_row_major_order_without_the_class_token():
    # 1 class token then a 2x2 grid of 3-channel patches: token k = (row k // 2, column k % 2).
    cls = torch.full((1, 1, 3), -1.0)
    patches = torch.tensor([[[0.0, 10, 20], [1, 11, 21], [2, 12, 22], [3, 13, 23]]])
    grid = tokens_to_map(torch.cat([cls, patches], 1), prefix=1, what="x")
    expected = torch.tensor([[[[0.0, 1], [2, 3]], [[10, 11], [12, 13]], [[20, 21], [22, 23]]]])
    assert torch.equal(grid, expected)  # [B, C, h, w]
    # Without a prefix count the fewest leaving a square are dropped: 1 here, 0 for bare patches.
    assert torch.equal(tokens_to_map(torch.cat([cls, patches], 1), prefix=None, what="x"), expected)
    assert torch.equal(tokens_to_map(patches, prefix=None, what="x"), expected)
    # DeiT's two prefix tokens (class and distillation) before 9 patches.
    assert tokens_to_map(torch.zeros(2, 2 + 9, 4), prefix=2, what="x").shape == (2, 4, 3, 3)
    # A map or an embedding is left as it is.
    for x in (torch.zeros(2, 4, 3, 3), torch.zeros(2, 4)):
        assert tokens_to_map(x, prefix=None, what="x") is x


def test_tokens_that_are_no_grid_are_refused_with_the_reason():
    with pytest.raises(KdlabError, match=r"The student's 'blocks\.0' is a sequence of 7 tokens of width 4"):
        tokens_to_map(torch.zeros(2, 7, 4), prefix=1, what="The student's 'blocks.0'")
    with pytest.raises(KdlabError, match="does not leave a square grid of patches"):
        tokens_to_map(torch.zeros(2, 3, 4), prefix=None, what="x")  # 3 or a class token and 2: no square


def test_the_prefix_count_is_the_models_own():
    vit = create_model(
        "timm/vit_tiny_patch16_224", num_classes=10, in_channels=1, input_size=28, depth=1, patch_size=4
    )
    assert prefix_tokens(vit) == 1 and prefix_tokens(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    ("teacher", "student", "teacher_layer"),
    [
        (["model@teacher=timm/resnet10t"], tiny_vit("student"), "stage3"),  # 4x4 (its last is 1x1)
        (tiny_vit("teacher"), ["model@student=lightnn"], "last_stage"),
    ],
    ids=["cnn-to-vit", "vit-to-cnn"],
)
def test_feature_losses_compare_a_vits_tokens_with_a_cnns_maps(
    teacher, student, teacher_layer, tmp_path, fashion_mnist
):
    # FitNets (a 1x1 regressor on the student's map) and AT (the larger map pooled to the smaller).
    args = [*cli_overrides(tmp_path), *teacher, *student, "knowledge=[fitnet,at]", NO_PLOTS]
    args += ["knowledge.at.student_layers=[last_stage]", f"knowledge.at.teacher_layers=[{teacher_layer}]"]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["train/fitnet_epoch"] > 0 and metrics["train/at_epoch"] > 0
