"""Features by module path from unmodified models."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.taps import FeatureTap


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
