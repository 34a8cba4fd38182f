"""SDD (scale decoupled distillation): by hand, what it reduces to, the authors' numbers, and the
schemes, settings and model pairs it refuses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.knowledge import DKD, KD, LossContext
from kdlab.knowledge.sdd import SDD
from kdlab.models import create_model
from kdlab.schemes import BYOT, Offline, Online
from kdlab.taps import Outputs

# Reference values: the authors' code, github.com/shicaiwei123/SDD-CVPR2024 @
# e412036c6b7b67d8ed25418d2dedad223ab49a71: mdistiller/models/cifar/utils.py `SPP`, the region logits
# of mdistiller/models/cifar/resnet.py `ResNet_SDD.forward` (SPP, permute, fc, reshape), and
# mdistiller/distillers/KD.py `sdd_kd_loss` (T 4) / SDD_DKD.py `multi_dkd` (alpha 1, beta 8, T 4),
# with their two `.cuda()` calls removed to run on the CPU; run once on the inputs of `seeded` below
# (float64, 8x8 maps). key: (base, M) -> loss, d loss / d student map[0,0,0,0], d loss / d student fc[0,0].
REFERENCE = {
    ("kd", (1, 2, 4)): (0.7394784436578323, 0.0009071498094210932, -0.06997796430727654),
    ("dkd", (1, 2, 4)): (5.500010957974829, 0.0055929004610066856, -0.11059136485878358),
    ("kd", (1, 2)): (0.32536306992789765, 0.0013369225734739488, -0.017311151887765445),
    ("dkd", (1, 2)): (2.5838792617214983, 0.008227349498259427, -0.029004888748083903),
}
AFTER_WARMUP = LossContext(epoch=100)


class Head(nn.Module):
    """A stand-in model: only its classifier (`fc`) is read by SDD."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc


def outputs(fmap: torch.Tensor, fc: nn.Linear, detach: bool = False) -> Outputs:
    logits = fc(fmap.mean(dim=(2, 3)))
    return Outputs(logits.detach() if detach else logits, {"a": fmap}, model=Head(fc))


def sdd(**kwargs) -> SDD:
    return SDD(student_layers=["a"], teacher_layers=["a"], **kwargs)


def linear(weight, bias) -> nn.Linear:
    weight, bias = torch.as_tensor(weight, dtype=torch.float64), torch.as_tensor(bias, dtype=torch.float64)
    fc = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return fc


def binary_kl(v: float) -> float:
    """KL(softmax([v, -v]) || [1/2, 1/2]) at T = 1."""
    p = 1 / (1 + math.exp(-2 * v))
    return p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))


def test_sdd_kd_by_hand_with_one_complementary_region():
    # One channel, two classes, head z = (v, -v). Teacher map [[2, -1], [1, 1]]: the global region
    # (mean 0.75) predicts class 0 = the label, so it is right; the 2x2 regions are the pixels
    # themselves, and only -1 predicts wrongly: it is the one complementary region (weight 2).
    # The student's map is 0 everywhere: uniform predictions. Sum over 5 regions, divided by 5.
    teacher = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]]]], dtype=torch.float64)
    student = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    head = linear([[1.0], [-1.0]], [0.0, 0.0])
    loss = sdd(base="kd", scales=[1, 2], temperature=1.0)
    s, t = outputs(student, head), outputs(teacher, head, detach=True)
    loss.build(s, t)
    expected = (binary_kl(0.75) + binary_kl(2) + 2 * binary_kl(-1) + binary_kl(1) + binary_kl(1)) / 5
    assert loss(s, t, {"target": torch.tensor([0])}).item() == pytest.approx(expected, rel=1e-12)
    # With two classes, the other label flips every region's correctness, the global one's too, so
    # the same region is the complementary one; its weight is complementary_weight.
    assert loss(s, t, {"target": torch.tensor([1])}).item() == pytest.approx(expected, rel=1e-12)
    loss.complementary_weight = 3.0
    heavier = (binary_kl(0.75) + binary_kl(2) + 3 * binary_kl(-1) + binary_kl(1) + binary_kl(1)) / 5
    assert loss(s, t, {"target": torch.tensor([0])}).item() == pytest.approx(heavier, rel=1e-12)


def seeded():
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(6, 5, 8, 8, generator=g, dtype=torch.float64)
    fcs = []
    for width in (3, 5):
        weight = torch.randn(4, width, generator=g, dtype=torch.float64)
        fcs.append(linear(weight, torch.randn(4, generator=g, dtype=torch.float64)))
    target = torch.randint(0, 4, (6,), generator=g)
    return x_s, x_t, fcs[0], fcs[1], target


def test_with_the_whole_image_alone_sdd_is_its_base_loss():
    x_s, x_t, fc_s, fc_t, target = seeded()
    s, t = outputs(x_s, fc_s), outputs(x_t, fc_t, detach=True)
    for base, reference in (("kd", KD(temperature=4.0)), ("dkd", DKD(warmup_epochs=0))):
        loss = sdd(base=base, scales=[1], complementary_weight=5.0)
        loss.build(s, t)
        value = loss(s, t, {"target": target}, AFTER_WARMUP)
        assert value.item() == pytest.approx(reference(s, t, {"target": target}).item(), rel=1e-10)


def test_zero_for_a_student_equal_to_its_teacher_and_plain_mean_without_reweighting():
    x_s, x_t, fc_s, fc_t, target = seeded()
    same = sdd(base="dkd")
    t = outputs(x_t, fc_t, detach=True)
    same.build(t, t)
    assert same(t, t, {"target": target}, AFTER_WARMUP).item() == pytest.approx(0, abs=1e-12)
    # complementary_weight 1: every region weighs the same, so the labels no longer enter SD-KD.
    s = outputs(x_s, fc_s)
    flat = sdd(base="kd", complementary_weight=1.0)
    flat.build(s, t)
    a = flat(s, t, {"target": target}).item()
    assert flat(s, t, {"target": (target + 1) % 4}).item() == pytest.approx(a, rel=1e-12)


@pytest.mark.parametrize("key", list(REFERENCE))
def test_matches_the_authors_code(key):
    base, scales = key
    x_s, x_t, fc_s, fc_t, target = seeded()
    s, t = outputs(x_s, fc_s), outputs(x_t, fc_t, detach=True)
    loss = sdd(base=base, scales=list(scales))
    loss.build(s, t)
    value = loss(s, t, {"target": target}, AFTER_WARMUP)
    value.backward()
    expected, grad_map, grad_fc = REFERENCE[key]
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert x_s.grad[0, 0, 0, 0].item() == pytest.approx(grad_map, rel=1e-5)
    assert fc_s.weight.grad[0, 0].item() == pytest.approx(grad_fc, rel=1e-5)
    assert fc_t.weight.grad is None  # the teacher's head is read, never trained


def test_sdd_dkd_warms_up_as_the_reference_and_says_when_it_needs_the_epoch():
    x_s, x_t, fc_s, fc_t, target = seeded()
    s, t = outputs(x_s, fc_s), outputs(x_t, fc_t, detach=True)
    loss = sdd()
    loss.build(s, t)
    full = loss(s, t, {"target": target}, AFTER_WARMUP).item()
    assert loss(s, t, {"target": target}, LossContext(epoch=4)).item() == pytest.approx(
        full * 5 / 20, rel=1e-12
    )
    assert loss.warmup_epochs == 20 and sdd(base="kd").warmup_epochs == 0
    with pytest.raises(KdlabError, match=r"knowledge.sdd \(SDD\) ramps its loss up .* needs the run's epoch"):
        loss(s, t, {"target": target})


# ---------------------------------------------------------------------------- in the schemes
def model(name: str):
    return create_model(name, num_classes=10, in_channels=1, input_size=28)


def common() -> dict:
    return dict(
        optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=10, input_shape=(1, 28, 28), num_samples=64
    )


def batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input": torch.randn(n, 1, 28, 28, generator=g),
        "target": torch.arange(n) % 10,
        "index": torch.arange(n),
    }


def test_offline_trains_the_students_classifier_and_online_leaves_the_peers_head_alone():
    torch.manual_seed(0)
    scheme = Offline(
        teacher=model("resnet14"), student=model("resnet8"), knowledge={"sdd": SDD()}, **common()
    )
    data = batch()
    scheme.knowledge["sdd"](
        scheme.student_tap(data["input"]), scheme.sources(data["input"], data), data, AFTER_WARMUP
    ).backward()
    assert scheme.student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in scheme.teacher.parameters())
    online = Online(student=model("resnet8"), teacher=model("resnet14"), knowledge={"sdd": SDD()}, **common())
    outputs_ = online.forward_peers(data["input"])
    term = online.knowledge["student"]["teacher"]["sdd"]
    term(outputs_["student"], online.source_outputs(outputs_, "teacher"), data, AFTER_WARMUP).backward()
    assert all(p.grad is None for p in online.peers["teacher"].parameters())
    assert online.peers["student"].fc.weight.grad.abs().sum() > 0


def test_bad_settings_and_pairs_it_cannot_handle_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge.sdd.scales=\[2, 4\]: .* include 1"):
        SDD(scales=[2, 4])
    with pytest.raises(KdlabError, match=r"knowledge.sdd.base='nkd' is not one of kd, dkd"):
        SDD(base="nkd")
    with pytest.raises(KdlabError, match=r"knowledge.sdd.warmup_epochs=-1"):
        SDD(warmup_epochs=-1)
    # resnet8's final map on 28x28 input is 7x7: 8x8 regions would repeat pixels.
    with pytest.raises(KdlabError, match=r"up to 8x8 regions, but that map is only 7x7"):
        Offline(
            teacher=model("resnet14"),
            student=model("resnet8"),
            knowledge={"sdd": SDD(scales=[1, 2, 8])},
            **common(),
        )
    # stage2 (32 channels) is not the map resnet8's classifier (64 features) pools.
    with pytest.raises(KdlabError, match=r"student's 'stage2' \(32 channels\) .* reads 64 features"):
        Offline(
            teacher=model("resnet14"),
            student=model("resnet8"),
            knowledge={"sdd": SDD(student_layers=["stage2"])},
            **common(),
        )
    # The pooled embedding is a 1x1 map: no regions below the whole image.
    with pytest.raises(KdlabError, match=r"up to 4x4 regions, but that map is only 1x1"):
        Offline(
            teacher=model("resnet14"),
            student=model("resnet8"),
            knowledge={"sdd": SDD(student_layers=["embedding"], teacher_layers=["embedding"])},
            **common(),
        )
    head = linear([[1.0], [-1.0]], [0.0, 0.0])
    vector = Outputs(torch.zeros(2, 2), {"a": torch.zeros(2, 1)}, model=Head(head))
    with pytest.raises(KdlabError, match=r"needs a \(batch, channels, height, width\) map"):
        sdd().build(vector, vector)
    # BYOT's exits carry no model whose classifier could read their regions.
    with pytest.raises(KdlabError, match=r"student's outputs carry no model.*mode=byot"):
        BYOT(student=model("resnet8"), knowledge={"sdd": SDD()}, **common())
