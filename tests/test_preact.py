"""Pre-activation tap points (stage<k>_preact) and the BatchNorm before each (kdlab.models.preact)."""

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.heads import norm_before
from kdlab.models import create_model
from kdlab.taps import FeatureTap, expand_layers


@pytest.mark.parametrize("name", ["resnet8x4", "resnet20", "resnet50", "torchvision/resnet18"])
def test_post_activation_resnets_preact_is_the_stage_output_before_its_relu(name):
    model = create_model(name, num_classes=10, input_size=32).eval()
    preacts = expand_layers(model, ["stages_preact"])
    stages = expand_layers(model, ["stages"])
    assert preacts == [f"{s}_preact" for s in stages]
    with torch.no_grad():
        feats = FeatureTap(model, preacts + stages)(torch.randn(2, 3, 32, 32)).feats
    for stage, preact in zip(stages, preacts, strict=True):
        # Negative responses survive (the in-place ReLU did not overwrite the tapped input) ...
        assert (feats[preact] < 0).any()
        # ... and the ReLU of the pre-activation is exactly the stage's output.
        torch.testing.assert_close(F.relu(feats[preact]), feats[stage])
        assert norm_before(model, preact).num_features == feats[preact].shape[1]


def test_wrn_preact_is_the_next_batchnorm_of_the_stage_output():
    model = create_model("wrn_16_2", num_classes=10).eval()
    with torch.no_grad():
        feats = FeatureTap(model, ["stage1", "stage1_preact", "stage3", "stage3_preact"])(
            torch.randn(2, 3, 32, 32)
        ).feats
    torch.testing.assert_close(feats["stage1_preact"], model.block2[0].bn1(feats["stage1"]))
    torch.testing.assert_close(feats["stage3_preact"], model.bn(feats["stage3"]))
    assert norm_before(model, "stage3_preact") is model.bn


def test_a_model_without_preact_points_gets_a_clear_error():
    model = create_model("vgg8", num_classes=10)
    with pytest.raises(KdlabError, match="no pre-activation stage taps"):
        expand_layers(model, ["stages_preact"], "teacher")
    with pytest.raises(KdlabError, match="names no BatchNorm"):
        norm_before(model, "stage1", "knowledge.ofd")


def test_a_tap_point_name_with_input_taps_what_that_module_is_given():
    model = create_model("resnet8", num_classes=10).eval()
    with torch.no_grad():
        feats = FeatureTap(model, ["embedding:input", "stage3"])(torch.randn(2, 3, 32, 32)).feats
    # What the global pooling reads is the last stage's output map.
    torch.testing.assert_close(feats["embedding:input"], feats["stage3"])
