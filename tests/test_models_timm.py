"""timm models by name (kdlab/models/timm_models.py): tiny configurations built offline, no weights.

A ResNet teacher with a ViT student and a ViT teacher with a CNN student train through the CLI, in
offline and online mode; the tap points come from timm's feature metadata; the input size follows
the data; and bad input (an unknown name, a model too deep for the images, pretrained weights with
no network) stops with a clear error.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from kdlab.build import build_model
from kdlab.errors import KdlabError
from kdlab.models import create_model
from kdlab.models.timm_models import tap_points
from kdlab.taps import FeatureTap
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main, sweep_overrides

# A 2-block ViT with 4-px patches: 49 tokens of 28x28 Fashion-MNIST, seconds on a CPU.
TINY_VIT = ["+{side}.depth=2", "+{side}.embed_dim=32", "+{side}.num_heads=2", "+{side}.patch_size=4"]


def tiny_vit(side: str) -> list[str]:
    return [f"model@{side}=timm/vit_tiny_patch16_224", *(o.format(side=side) for o in TINY_VIT)]


def test_taps_are_timms_feature_metadata_and_the_classifiers_input():
    cnn = create_model("timm/resnet10t", num_classes=10, in_channels=1, input_size=28)
    names = [entry["module"] for entry in cnn.feature_info]
    assert cnn.tap_points == {**{f"stage{i}": m for i, m in enumerate(names, 1)}, "embedding": "fc:input"}
    vit = create_model(
        "timm/vit_tiny_patch16_224",
        num_classes=10,
        in_channels=1,
        input_size=28,
        depth=2,
        embed_dim=32,
        num_heads=2,
        patch_size=4,
    )
    assert vit.tap_points == {"stage1": "blocks.0", "stage2": "blocks.1", "embedding": "head:input"}
    # What the losses read: a map for the CNN's stage, tokens for the ViT's block, [B, C] embeddings.
    x = torch.randn(2, 1, 28, 28)
    cnn_out = FeatureTap(cnn, [cnn.tap_points["stage5"], cnn.tap_points["embedding"]])(x)
    vit_out = FeatureTap(vit, [vit.tap_points["stage2"], vit.tap_points["embedding"]])(x)
    assert cnn_out.feats[cnn.tap_points["stage5"]].dim() == 4
    assert vit_out.feats["blocks.1"].shape == (2, 1 + 49, 32)  # the CLS token and 7x7 patches
    assert vit_out.feats["head:input"].shape == (2, 32)
    # The embedding tap is exactly the pre-logits features timm's own API returns.
    features = vit.forward_head(vit.forward_features(x), pre_logits=True)
    torch.testing.assert_close(vit_out.feats["head:input"], features)


def test_a_fixed_size_architecture_is_built_for_the_datas_images():
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=10, in_channels=1, input_size=32, depth=1)
    assert vit.patch_embed.img_size == (32, 32) and vit.patch_embed.num_patches == 4  # 16-px patches
    assert tuple(vit(torch.zeros(1, 1, 32, 32)).shape) == (1, 10)
    # A convolutional model takes the images as they are.
    cnn = create_model("timm/resnet10t", num_classes=100, in_channels=3, input_size=32)
    assert tuple(cnn(torch.zeros(2, 3, 32, 32)).shape) == (2, 100)


def test_the_model_configs_compose_with_the_datas_facts_and_timms_options(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "model@teacher=timm/resnet10t", *tiny_vit("student")])
    assert cfg.teacher.name == "timm/resnet10t" and cfg.student.depth == 2
    student = build_model(cfg.student)
    assert len(student.blocks) == 2 and student.head.out_features == 10
    assert student.patch_embed.proj.in_channels == 1


@pytest.mark.parametrize(
    ("teacher", "student"),
    [
        (["model@teacher=timm/resnet10t"], tiny_vit("student")),
        (tiny_vit("teacher"), ["model@student=timm/resnet10t"]),
    ],
    ids=["resnet-to-vit", "vit-to-resnet"],
)
def test_cross_family_pairs_train_through_the_cli(teacher, student, tmp_path, fashion_mnist):
    # Offline and online, each with KD, a feature loss (FitNets: tokens and maps through the layouts)
    # and OFA-KD (branches to the logits): one CLI multirun of 6 jobs per direction.
    sweep = tmp_path / "sweep"
    args = [*sweep_overrides(tmp_path, batches=2), f"hydra.sweep.dir={sweep}", *teacher, *student, NO_PLOTS]
    proc = run_main(["-m", *args, "mode=offline,online", "knowledge=kd,fitnet,ofa"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {}
    for job in sorted(sweep.glob("*/metrics.json")):
        results = json.loads(job.read_text())
        architectures = {row["model"]: row["architecture"] for row in results["models"]}
        assert architectures["student"] == student[0].split("=", 1)[1]
        assert architectures["teacher"] == teacher[0].split("=", 1)[1]
        assert 0.0 <= results["metrics"]["test/student/top1"] <= 1.0
        terms = [key for key in results["metrics"] if key.startswith("train/") and "task" not in key]
        assert terms, results["metrics"].keys()
        ran[(results["mode"], tuple(results["knowledge"]))] = results
    assert sorted(ran) == sorted(
        (mode, (k,)) for mode in ("offline", "online") for k in ("kd", "fitnet", "ofa")
    )


def test_a_sweep_over_timm_models_runs_each(tmp_path, fashion_mnist):
    sweep = tmp_path / "sweep"
    args = [*sweep_overrides(tmp_path), f"hydra.sweep.dir={sweep}", "mode=baseline", NO_PLOTS]
    proc = run_main(["-m", *args, "model@student=timm/resnet10t,timm/mobilenetv3_small_050"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [run["models"][0]["architecture"] for run in ran] == [
        "timm/resnet10t",
        "timm/mobilenetv3_small_050",
    ]


def test_an_unknown_timm_name_is_a_clear_error(tmp_path):
    with pytest.raises(
        KdlabError, match=r"'timm/resnet1O' is not a timm model\. Similar names: timm/resnet18"
    ):
        create_model("timm/resnet1O", num_classes=10, in_channels=1, input_size=28)
    proc = run_main([*cli_overrides(tmp_path), "model@student=timm/vit_tiny_patch16_2244"], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "'timm/vit_tiny_patch16_2244' is not a timm model" in proc.stderr


def test_a_model_that_cannot_take_the_images_says_so_before_training():
    with pytest.raises(KdlabError, match=r"timm/convnext_atto cannot take the data's 28x28 images"):
        create_model("timm/convnext_atto", num_classes=10, in_channels=1, input_size=28)


def test_pretrained_weights_without_network_are_a_clear_error(tmp_path, monkeypatch):
    # What a machine without network gets, without waiting for its connection attempts: the hub reads
    # this constant when it downloads (the environment variable only when it is imported).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdlabError, match=r"pretrained=true: loading its weights from the network") as error:
        create_model("timm/resnet10t", num_classes=10, in_channels=1, input_size=28, pretrained=True)
    assert "pretrained_file=/path/to/weights" in str(error.value)


def test_pretrained_file_loads_local_weights(tmp_path):
    source = timm.create_model("resnet10t", num_classes=1000)  # as timm's own weights come
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model(
        "timm/resnet10t", num_classes=10, in_channels=3, input_size=32, pretrained_file=str(path)
    )
    # Every weight but the classifier, which timm makes anew for the data's 10 classes.
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert model.fc.out_features == 10 and tap_points(model)["embedding"] == "fc:input"
