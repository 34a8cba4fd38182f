"""BYOT auxiliary exits (Zhang et al. 2019, "Be Your Own Teacher", ICCV): shapes, isolation, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.models.exits import AuxiliaryExits, Exit
from kdlab.taps import FeatureTap, expand_layers

# (model, number of stages): an exit for every stage but the deepest.
MODELS = [("resnet8", 3), ("resnet8x4", 3), ("wrn_16_2", 3), ("lightnn", 2)]
SHAPES = [(1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny: with 2 cores shared by other test processes, intra-op threads only
    # contend (a WRN-16-2 forward drops from ~0.7 s to ~10 ms on one thread).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(name: str, shape: tuple[int, int, int]) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=shape[0], input_size=shape[1])


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "n_stages"), MODELS, ids=[m for m, _ in MODELS])
def test_exits_match_the_deepest_stage(name, n_stages, shape):
    model = _build(name, shape).eval()
    exits = AuxiliaryExits(model, NUM_CLASSES, shape).eval()
    assert exits.stage_names == [f"stage{i}" for i in range(1, n_stages)]
    assert exits.deepest == f"stage{n_stages}"
    assert list(exits.exits) == exits.stage_names

    tap = FeatureTap(model, expand_layers(model, ["stages"]))
    with torch.no_grad():
        feats = tap(torch.randn(3, *shape)).feats
        out = exits(feats)
    deepest = feats[exits.deepest].shape
    assert set(out) == set(exits.stage_names)
    for stage, (feature_map, logits) in out.items():
        assert feature_map.shape == deepest, stage
        assert logits.shape == (3, NUM_CLASSES), stage

    n_exits, n_backbone = _n_params(exits), _n_params(model)
    assert 0 < n_exits < 10 * n_backbone, (
        f"{name} {shape}: exits have {n_exits} parameters, backbone {n_backbone}"
    )


@pytest.mark.parametrize(("name", "n_stages"), MODELS, ids=[m for m, _ in MODELS])
def test_building_exits_leaves_the_backbone_untouched(name, n_stages):
    shape = (3, 32, 32)
    model = _build(name, shape)  # left in train mode: the dry run must restore it
    x = torch.randn(4, *shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()

    exits = AuxiliaryExits(model, NUM_CLASSES, shape)

    assert model.training
    assert list(model.state_dict()) == list(state)
    # Bit-identical buffers too: the dry run must not move BatchNorm running statistics.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules()), "the dry run's hooks were left behind"
    # The exits hold no backbone tensor, so dropping them (or saving the backbone) is clean.
    backbone_tensors = {t.data_ptr() for t in model.state_dict().values()}
    assert not backbone_tensors & {t.data_ptr() for t in exits.state_dict().values()}
    assert all(k.startswith("exits.") for k in exits.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_exit_gradients_reach_the_exit_and_the_earlier_stages():
    shape = (3, 32, 32)
    model = _build("resnet8", shape).train()
    exits = AuxiliaryExits(model, NUM_CLASSES, shape).train()
    tap = FeatureTap(model, expand_layers(model, ["stages"]))
    outputs = tap(torch.randn(4, *shape))
    _, logits = exits(outputs.feats)["stage1"]
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()

    for pname, param in exits.exits["stage1"].named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    assert model.conv1.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    # The stage1 exit's loss does not depend on the later stages or the other exit.
    assert model.layer3[0].conv1.weight.grad is None
    assert model.fc.weight.grad is None
    assert all(p.grad is None for p in exits.exits["stage2"].parameters())


def test_models_without_stages_are_rejected():
    tv = create_model("torchvision/mobilenet_v3_small", num_classes=NUM_CLASSES, in_channels=3)
    with pytest.raises(KdlabError, match="other than its ResNets"):
        AuxiliaryExits(tv, NUM_CLASSES, (3, 32, 32))

    class OneStage(nn.Module):
        tap_points = {"stage1": "conv", "embedding": "conv"}

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(KdlabError, match="at least two named stages"):
        AuxiliaryExits(OneStage(), NUM_CLASSES, (3, 32, 32))


def test_bad_input_shape_and_missing_features_are_explained():
    model = _build("resnet8", (3, 32, 32))
    with pytest.raises(KdlabError, match="channels, height, width"):
        AuxiliaryExits(model, NUM_CLASSES, (32, 32))
    with pytest.raises(KdlabError, match="input_shape"):
        AuxiliaryExits(model, NUM_CLASSES, (1, 32, 32))  # the model takes 3 channels
    exits = AuxiliaryExits(model, NUM_CLASSES, (3, 32, 32))
    with pytest.raises(KdlabError, match="stage2 is missing"):
        exits({"stage1": torch.randn(1, 16, 32, 32)})


def test_exit_shapes_on_its_own():
    # Two halvings (32 -> 16 -> 8), widths growing 16 -> 64.
    feature_map, logits = Exit(16, 32, 64, 8, 5)(torch.randn(2, 16, 32, 32))
    assert feature_map.shape == (2, 64, 8, 8) and logits.shape == (2, 5)
    # Same resolution: a single 1x1 conv-BN-ReLU.
    same = Exit(512, 4, 512, 4, 5)
    assert [type(m) for m in same.bottleneck] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert same.bottleneck[0].kernel_size == (1, 1)
    # An odd side the backbone floors (VGG at 28x28: 7 -> 3) is trimmed to the exact size.
    feature_map, _ = Exit(256, 7, 512, 3, 5)(torch.randn(2, 256, 7, 7))
    assert feature_map.shape == (2, 512, 3, 3)
    with pytest.raises(KdlabError, match="only downsamples"):
        Exit(16, 4, 32, 8, 5)


def test_final_activation_follows_the_deepest_stage():
    # CIFAR ResNet stages end on ReLU; WRN stages are read before their BN-ReLU.
    resnet = AuxiliaryExits(_build("resnet8", (3, 32, 32)), NUM_CLASSES, (3, 32, 32))
    wrn = AuxiliaryExits(_build("wrn_16_2", (3, 32, 32)), NUM_CLASSES, (3, 32, 32))
    assert isinstance(resnet.exits["stage1"].bottleneck[-1], nn.ReLU)
    assert isinstance(wrn.exits["stage1"].bottleneck[-1], nn.BatchNorm2d)
    feature_map, _ = wrn.exits["stage2"].eval()(torch.randn(2, 64, 16, 16))
    assert (feature_map < 0).any()
