"""Features by module path from unmodified models."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.taps import FeatureTap, expand_layers


def test_tap_returns_logits_and_the_named_features_only():
    model = create_model("resnet8", num_classes=10, in_channels=1, input_size=28).eval()
    tap = FeatureTap(model, ["layer2", "layer3", "layer2"])
    out = tap(torch.randn(2, 1, 28, 28))
    assert set(out.feats) == {"layer2", "layer3"}
    assert out.feats["layer2"].shape == (2, 32, 14, 14)
    assert out.feats["layer3"].shape == (2, 64, 7, 7)
    assert out.logits.shape == (2, 10)


def test_tap_does_not_change_the_model_output():
    model = create_model("lightnn", num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    before = model(x)
    tap = FeatureTap(model, ["features"])
    assert torch.equal(tap(x).logits, before)
    tap.remove()
    assert not model.features._forward_hooks


def test_unknown_layer_lists_the_module_paths():
    model = create_model("resnet8", num_classes=10, in_channels=1, input_size=28)
    with pytest.raises(KdlabError) as error:
        FeatureTap(model, ["layer9"], role="student")
    message = str(error.value)
    assert "'layer9'" in message and "layer1.0.conv1" in message and "layer3" in message


def test_named_tap_points_resolve_to_module_paths():
    model = create_model("resnet8", num_classes=10, in_channels=1, input_size=28).eval()
    out = FeatureTap(model, ["stage2", "embedding"])(torch.randn(2, 1, 28, 28))
    assert out.feats["stage2"].shape == (2, 32, 14, 14)
    assert out.feats["embedding"].flatten(1).shape == (2, 64)


def test_stage_groups_expand_per_model():
    tutorial = create_model("lightnn", num_classes=10, in_channels=1, input_size=28)
    resnet = create_model("resnet8", num_classes=10, in_channels=1, input_size=28)
    assert expand_layers(tutorial, ["stages"]) == ["stage1", "stage2"]
    assert expand_layers(resnet, ["stages", "embedding"]) == ["stage1", "stage2", "stage3", "embedding"]
    assert expand_layers(resnet, ["last_stage"]) == ["stage3"]
    # torchvision's ResNets get kdlab's stage names; its other models are tapped by module path.
    torchvision_resnet = create_model("torchvision/resnet18", num_classes=10, in_channels=1)
    assert expand_layers(torchvision_resnet, ["stages"]) == ["stage1", "stage2", "stage3", "stage4"]
    torchvision_model = create_model("torchvision/mobilenet_v3_small", num_classes=10, in_channels=1)
    with pytest.raises(KdlabError, match="no named stages"):
        expand_layers(torchvision_model, ["stages"], role="student")
