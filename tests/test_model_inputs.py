"""Each model's own input (kdlab/models/inputs.py): size, channels and normalisation per model.

The conversion is checked against the same image prepared by hand the way a user prepares it for a
pretrained model (raw pixels resized, then normalised with the model's statistics), and a run with a
teacher at its own input is checked from the outside: its teacher's test top-1 is recomputed from the
saved weights of the bare network, fed images converted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from kdlab.build import instantiate
from kdlab.efficiency import flops_per_image
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.models.inputs import ConvertInput, InputSpec
from kdlab.run import train
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
FASHION = {"in_channels": 1, "input_size": 28, "mean": [0.2860], "std": [0.3530]}


class Recorder(torch.nn.Module):
    """A model that returns what it was given, to read the conversion's output."""

    def forward(self, x):
        return x


def converted(x_data: torch.Tensor, data: InputSpec, model: InputSpec) -> torch.Tensor:
    return ConvertInput(data, model)(Recorder(), (x_data,))[0]


def test_gray_data_becomes_an_imagenet_normalised_rgb_image_at_the_models_size():
    pixels = torch.rand(2, 1, 7, 7)
    data = InputSpec(1, 7, (0.2860,), (0.3530,))
    model = InputSpec(3, 14, tuple(IMAGENET["mean"]), tuple(IMAGENET["std"]))
    x_data = (pixels - 0.2860) / 0.3530
    # By hand: raw pixels as RGB, upsampled bilinearly (half-pixel centres), then ImageNet-normalised.
    rgb = F.interpolate(pixels.repeat(1, 3, 1, 1), size=(14, 14), mode="bilinear", align_corners=False)
    expected = (rgb - torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET["std"]).view(
        1, 3, 1, 1
    )
    assert torch.allclose(converted(x_data, data, model), expected, atol=1e-5)


def test_a_smaller_model_input_is_an_antialiased_resize_of_the_image():
    pixels = torch.rand(1, 3, 32, 32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    data = InputSpec(3, 32, mean, std)
    model = InputSpec(3, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the raw pixels, at half the size
    x_data = v2.Normalize(mean, std)(pixels)
    expected = v2.functional.resize(pixels, [16, 16], antialias=True)
    assert torch.allclose(converted(x_data, data, model), expected, atol=1e-5)
    # A uniform image stays uniform, at its raw pixel value in every channel.
    flat = v2.Normalize(mean, std)(torch.full((1, 3, 32, 32), 0.7))
    assert torch.allclose(converted(flat, data, model), torch.full((1, 3, 16, 16), 0.7), atol=1e-5)


def test_the_same_statistics_at_another_size_only_resize():
    x = torch.randn(1, 1, 4, 4)
    spec = InputSpec(1, 4, (0.3,), (0.4,))
    out = converted(x, spec, InputSpec(1, 8, (0.3,), (0.4,)))
    assert torch.allclose(out, F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False), atol=1e-6)


def test_a_model_that_takes_the_datas_input_gets_no_hook():
    model = create_model("lightnn", 10, 1, 28, data_input=FASHION, config_key="student")
    assert not model._forward_pre_hooks and not hasattr(model, "input_spec")
    same = create_model("lightnn", 10, 1, 28, mean=[0.2860], std=[0.3530], data_input=FASHION)
    assert not same._forward_pre_hooks


def test_a_teacher_at_its_own_input_runs_on_the_datas_batches():
    teacher = create_model("deepnn", 10, 3, 64, **IMAGENET, data_input=FASHION, config_key="teacher")
    assert teacher.input_spec == InputSpec(3, 64, tuple(IMAGENET["mean"]), tuple(IMAGENET["std"]))
    first_conv = teacher.features[0]
    seen = []
    handle = first_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    assert teacher(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    handle.remove()
    assert seen == [torch.Size([2, 3, 64, 64])]
    with pytest.raises(KdlabError, match="3-channel 64 px input, but was given a batch of shape"):
        teacher(torch.randn(2, 3, 64, 64))


def test_a_torchvision_model_at_224_px_with_imagenet_statistics():
    model = create_model(
        "torchvision/resnet18", 10, 3, 224, **IMAGENET, data_input=FASHION, config_key="teacher"
    )
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"in_channels": 3, "mean": [0.5, 0.5, 0.5]}, r"teacher.mean is set but teacher.std is not"),
        (
            {"in_channels": 3, "mean": [0.5], "std": [0.2] * 3},
            r"teacher.mean has 1 values .* 3 input channels",
        ),
        ({"in_channels": 1, "mean": [0.5], "std": [0.0]}, r"teacher.std=\[0.0\] must be positive"),
        ({"in_channels": 1, "mean": ["a"], "std": [0.2]}, r"teacher.mean=\['a'\] must be a list of numbers"),
    ],
)
def test_bad_model_inputs_name_the_key(options, message):
    with pytest.raises(KdlabError, match=message):
        create_model("deepnn", 10, input_size=28, data_input=FASHION, config_key="teacher", **options)


def test_rgb_data_is_not_turned_into_a_gray_model_input():
    rgb = {"in_channels": 3, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(KdlabError, match=r"student.in_channels=1, but the data's images have 3 channels"):
        create_model("lightnn", 10, 1, 32, data_input=rgb, config_key="student")


def test_a_data_config_without_statistics_cannot_be_converted_from():
    bare = {"in_channels": 1, "input_size": 28, "mean": None, "std": None}
    assert not create_model("lightnn", 10, 1, 28, data_input=bare)._forward_pre_hooks
    with pytest.raises(KdlabError, match=r"no data.mean and data.std to convert from"):
        create_model("lightnn", 10, 1, 56, data_input=bare, config_key="student")


def test_the_cli_names_the_key_of_a_bad_model_input(tmp_path):
    proc = run_main(["teacher.in_channels=3", "teacher.mean=[0.5]", *cli_overrides(tmp_path)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "teacher.mean is set but teacher.std is not" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_statistics_are_a_setting_of_the_data_config():
    cfg = compose_config(["data.mean=[0.5]", "data.std=[0.5]"])
    assert cfg.teacher.data_input.mean == [0.5]
    datamodule = instantiate(cfg.data)
    assert datamodule.mean == (0.5,) and datamodule.std == (0.5,)
    with pytest.raises(KdlabError, match=r"data.std=.* must be 1 positive number"):
        instantiate(compose_config(["data.std=[0.5,0.5]"]).data)


@pytest.fixture(scope="module")
def own_input_run(tmp_path_factory, fashion_mnist):
    """Offline KD from a DeepNN teacher at 40 px RGB with ImageNet statistics into the data's
    28 px gray LightNN."""
    tmp_path = tmp_path_factory.mktemp("own_input")
    overrides = [
        *fast_overrides(tmp_path, batches=4),
        "teacher.input_size=40",
        "teacher.in_channels=3",
        f"teacher.mean={IMAGENET['mean']}",
        f"teacher.std={IMAGENET['std']}",
        "data.batch_size=64",
        "trainer.limit_test_batches=2",
        NO_PLOTS,
    ]
    cfg = compose_config(overrides)
    return cfg, train(cfg)


def test_the_teachers_top1_is_recomputed_from_its_bare_weights_and_images_converted_by_hand(own_input_run):
    cfg, results = own_input_run
    bare = create_model("deepnn", 10, 3, 40, checkpoint=results["teacher"]["path"]).eval()
    assert not bare._forward_pre_hooks
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    mean, std = (
        torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1),
        torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1),
    )
    correct = total = 0
    with torch.no_grad():
        for i, batch in enumerate(datamodule.test_dataloader()):
            if i == 2:
                break
            pixels = batch["input"] * 0.3530 + 0.2860  # the data's normalisation undone
            x = (F.interpolate(pixels.repeat(1, 3, 1, 1), size=(40, 40), mode="bilinear") - mean) / std
            correct += int((bare(x).argmax(1) == batch["target"]).sum())
            total += len(batch["target"])
    written = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())
    assert written["metrics"]["test/teacher/top1"] == pytest.approx(correct / total, abs=1e-6)


def test_the_efficiency_of_a_teacher_at_its_own_input_is_that_of_the_network_at_its_size(own_input_run):
    _, results = own_input_run
    costs = results["efficiency"]["models"]
    bare = create_model("deepnn", 10, 3, 40)
    assert costs["teacher"]["flops"] == flops_per_image(bare, (3, 40, 40))
    assert costs["student"]["flops"] == flops_per_image(create_model("lightnn", 10, 1, 28), (1, 28, 28))
    assert results["efficiency"]["input_shape"] == [1, 28, 28]  # both measured on the data's images


def test_the_measured_copy_keeps_the_models_own_input_hooks_and_drops_the_taps():
    from kdlab.efficiency import deployed_copy
    from kdlab.taps import FeatureTap

    gray = create_model("torchvision/resnet18", 10, 1, 28)  # gray_to_rgb: part of the model
    FeatureTap(gray, ["layer1"])
    copy = deployed_copy(gray)
    assert len(copy._forward_pre_hooks) == 1 and not copy.layer1._forward_hooks
    assert copy(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    teacher = create_model("deepnn", 10, 3, 40, **IMAGENET, data_input=FASHION)
    assert deployed_copy(teacher)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
