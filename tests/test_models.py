"""Tests for the model zoo: registry, architectures, Hydra model configs and checkpoint loading."""

import copy
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdlab.errors import KdlabError
from kdlab.models import create_model, list_models, load_weights, register_model
from kdlab.taps import FeatureTap, stage_aliases

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# (in_channels, input_size, num_classes): Fashion-MNIST-like and CIFAR-100-like inputs.
SHAPES = [(1, 28, 10), (3, 32, 100)]

# Millions of parameters at 100 classes, from the CRD paper (Tian et al. 2020) / RepDistiller tables.
CRD_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- registry and architectures ---------------------------------------------------------------


def test_registry_holds_the_builtin_zoo():
    expected = {"deepnn", "lightnn"} | {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)}
    expected |= {"resnet8x4", "resnet32x4"}
    expected |= {"wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2", "shufflev1", "shufflev2"}
    expected |= {"resnet50"}
    assert set(list_models()) == expected
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels,input_size,num_classes", SHAPES)
def test_every_model_gives_logits(name, in_channels, input_size, num_classes):
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, input_size, input_size))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,millions", sorted(CRD_PARAMS_M.items()))
def test_parameter_counts_match_crd_tables(name, millions):
    assert round(n_params(create_model(name, num_classes=100)) / 1e6, 2) == millions


def test_tutorial_nets_match_the_tutorial():
    # The tutorial prints these totals for CIFAR-10 (10 classes, 3x32x32).
    assert n_params(create_model("deepnn", num_classes=10)) == 1_186_986
    assert n_params(create_model("lightnn", num_classes=10)) == 267_738
    assert create_model("deepnn", num_classes=10).classifier[0].in_features == 2048
    assert create_model("lightnn", num_classes=10).classifier[0].in_features == 1024
    # 28x28 input -> 7x7 map after the two pools.
    assert create_model("lightnn", num_classes=10, input_size=28).classifier[0].in_features == 16 * 7 * 7


@pytest.mark.parametrize("name", list_models())
def test_tap_points_name_module_paths_in_order(name):
    # 16x16 input keeps this cheap; the shape tests above cover full-size inputs.
    model = create_model(name, num_classes=10, input_size=16).eval()
    points = model.tap_points
    stages = stage_aliases(model)
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)] and "embedding" in points, points
    tap = FeatureTap(model, list(points))  # module outputs, and module inputs for ":input" points
    with torch.no_grad():
        seen = tap(torch.randn(2, 3, 16, 16)).feats
    assert set(seen) == set(points)
    assert all(seen[s].dim() == 4 for s in stages)
    assert seen["embedding"].flatten(1).shape[0] == 2


def test_resnet_structure_follows_crd():
    plain, wide = create_model("resnet20", num_classes=100), create_model("resnet32x4", num_classes=100)
    assert [len(getattr(plain, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert [len(getattr(wide, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    assert plain.conv1.out_channels == 16 and plain.fc.in_features == 64
    assert wide.conv1.out_channels == 32 and wide.fc.in_features == 256
    # Projection shortcuts exactly where the shape changes: x4's layer1 widens 32 -> 64 at stride 1.
    assert plain.layer1[0].downsample is None and plain.layer2[0].downsample is not None
    assert wide.layer1[0].downsample is not None and wide.layer1[1].downsample is None
    for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"):
        plain.get_submodule(name)
    assert torch.all(plain.bn1.weight == 1) and torch.all(plain.bn1.bias == 0)


def test_torchvision_model_on_grayscale_28px():
    model = create_model("torchvision/resnet18", num_classes=10, in_channels=1, input_size=28).eval()
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.in_channels == 3  # torchvision's own layers, not a wrapper
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 10)
        # The hook repeats the gray channel, so it equals feeding the 3-channel copy.
        assert torch.allclose(logits, model(x.repeat(1, 3, 1, 1)))
        # Hooked models must survive pickling (DDP spawn, checkpoint callbacks) and deepcopy (EMA, teachers).
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.allclose(clone(x), logits)


def test_torchvision_rgb_has_no_hook_and_passes_kwargs():
    model = create_model("torchvision/resnet18", num_classes=7, weights=None, zero_init_residual=True)
    assert model.fc.out_features == 7
    assert not model._forward_pre_hooks
    assert torch.all(model.layer1[0].bn2.weight == 0)  # zero_init_residual reached torchvision


def test_torchvision_rejects_other_channel_counts():
    with pytest.raises(KdlabError, match="in_channels=2"):
        create_model("torchvision/resnet18", num_classes=10, in_channels=2)


def test_unknown_torchvision_name_suggests_similar_names():
    with pytest.raises(KdlabError) as err:
        create_model("torchvision/resnet181", num_classes=10)
    assert "resnet18" in str(err.value) and "list_models" in str(err.value)


def test_unknown_name_lists_registered_models():
    with pytest.raises(KdlabError) as err:
        create_model("resnet7", num_classes=10)
    message = str(err.value)
    assert "resnet7" in message
    assert all(name in message for name in list_models())
    assert "torchvision/<name>" in message


def test_unknown_option_for_kdlab_model_is_rejected():
    with pytest.raises(KdlabError, match="weights"):
        create_model("resnet8", num_classes=10, weights="DEFAULT")


def test_duplicate_registration_is_rejected():
    with pytest.raises(KdlabError, match="already registered"):
        register_model("resnet8")(lambda **kw: torch.nn.Identity())


# --- Hydra configs ------------------------------------------------------------------------------


def test_every_model_has_exactly_one_config():
    names = {}
    for path in CONF_DIR.glob("*.yaml"):
        if path.stem in ("torchvision", "timm"):  # a family by name (torchvision/<name>, timm/<name>)
            continue
        cfg = OmegaConf.load(path)
        assert dict(cfg) == {"_target_": "kdlab.models.create_model", "name": path.stem}
        assert path.read_text().startswith("# ")
        names[path.stem] = cfg.name
    assert set(names.values()) == set(list_models())


def test_configs_instantiate_through_hydra():
    for stem in ("resnet8", "torchvision"):
        cfg = OmegaConf.load(CONF_DIR / f"{stem}.yaml")
        model = instantiate(cfg, num_classes=10, in_channels=1, input_size=28)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert OmegaConf.load(CONF_DIR / "torchvision.yaml").weights is None


# --- checkpoint loading -------------------------------------------------------------------------


def test_load_plain_state_dict(tmp_path):
    source = create_model("resnet8", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = create_model("resnet8", num_classes=10)
    assert not same_weights(source, target)
    load_weights(target, tmp_path / "w.pt")
    assert same_weights(source, target)


def test_load_lightning_style_picks_the_matching_prefix(tmp_path):
    student = create_model("lightnn", num_classes=10)
    teacher = create_model("deepnn", num_classes=10)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / "last.ckpt")

    loaded_student = create_model("lightnn", num_classes=10, checkpoint=str(tmp_path / "last.ckpt"))
    assert same_weights(student, loaded_student)
    loaded_teacher = create_model("deepnn", num_classes=10, checkpoint=str(tmp_path / "last.ckpt"))
    assert same_weights(teacher, loaded_teacher)


def test_load_prefers_student_when_prefixes_tie(tmp_path):
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    state = {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.{k}": v for k, v in student.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "self_kd.ckpt")
    target = create_model("resnet8", num_classes=10)
    load_weights(target, tmp_path / "self_kd.ckpt")
    assert same_weights(student, target)


def test_load_wrong_architecture_names_the_keys(tmp_path):
    torch.save({"state_dict": create_model("resnet8", num_classes=10).state_dict()}, tmp_path / "r8.pt")
    with pytest.raises(KdlabError) as err:
        load_weights(create_model("resnet14", num_classes=10), tmp_path / "r8.pt")
    message = str(err.value)
    assert str(tmp_path / "r8.pt") in message
    assert "missing from the checkpoint" in message and "layer1.1.conv1.weight" in message
    assert "teacher.name=" in message


def test_load_shape_mismatch_and_unexpected_keys_are_named(tmp_path):
    torch.save(create_model("deepnn", num_classes=10).state_dict(), tmp_path / "deep.pt")
    with pytest.raises(KdlabError) as err:
        load_weights(create_model("lightnn", num_classes=10), tmp_path / "deep.pt")
    message = str(err.value)
    # DeepNN's 5th module is a conv (LightNN has a pool there); both have features.0 with other widths.
    assert "unexpected in the checkpoint" in message and "features.2.weight" in message
    assert "different shape" in message and "features.0.weight (checkpoint (128, 3, 3, 3)" in message


def test_load_different_num_classes_reports_fc_shape(tmp_path):
    torch.save(create_model("resnet8", num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(KdlabError, match=r"fc\.weight \(checkpoint \(100, 64\) vs model \(10, 64\)\)"):
        load_weights(create_model("resnet8", num_classes=10), tmp_path / "c100.pt")


def test_load_missing_file(tmp_path):
    with pytest.raises(KdlabError, match="does not exist") as err:
        load_weights(create_model("resnet8", num_classes=10), tmp_path / "nope.pt")
    assert "nope.pt" in str(err.value)


def test_load_corrupt_and_truncated_files(tmp_path):
    model = create_model("resnet8", num_classes=10)
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x17 this is not a checkpoint \xff" * 10)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:500])
    for name in ("garbage.pt", "cut.pt"):
        with pytest.raises(KdlabError, match="Could not read") as err:
            load_weights(model, tmp_path / name)
        assert name in str(err.value)


def test_load_file_without_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(KdlabError, match="not a state_dict"):
        load_weights(create_model("resnet8", num_classes=10), tmp_path / "tensor.pt")


def test_load_refuses_pickled_objects_with_a_clear_message(tmp_path):
    model = create_model("resnet8", num_classes=10)
    hparams = OmegaConf.create({"lr": 0.1})  # what save_hyperparameters may store in a Lightning file
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "hp.ckpt")
    with pytest.raises(KdlabError, match="omegaconf.dictconfig.DictConfig") as err:
        load_weights(model, tmp_path / "hp.ckpt")
    assert "OmegaConf.to_container" in str(err.value)
