"""SRD (softmax regression representation learning): by hand, its invariances, the anchors' numbers,
and the schemes and settings it refuses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.knowledge.srd import SRD
from kdlab.models import create_model
from kdlab.schemes import BYOT, Offline, Online
from kdlab.taps import Outputs

# Reference values, each computed once by the anchor's own code on the inputs of `seeded` below
# (float64, connector conv weights copied, BatchNorm in training mode):
# - the authors' code, github.com/jingyang2017/KD_SRRL @ d2e802f5f57efd4f5bc6326a697b48236008a5b6:
#   distiller_zoo/AIN.py `transfer_conv` and `statm_loss` (its forward; train_imagenet_distillation.py
#   calls the class as if it were that function), the teacher head of models/official_resnet.py
#   (avgpool, flatten, fc) and `loss_stat + F.mse_loss(pred_sc, pred_t) * 1`, on 4-D maps;
# - the SimKD benchmark's CIFAR code, github.com/DefangChen/SimKD @
#   2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01: models/util.py `SRRL` and helper/loops.py's
#   `MSELoss(trans_feat_s, feat_t) + MSELoss(pred_feat_s, logit_t)`, on pooled vectors.
AUTHORS = {
    "loss": 0.9992400667771935,
    "grad_s_0000": -0.005731502260746067,
    "grad_conv_0000": -0.04091820980743375,
}
SIMKD = {
    "loss": 5.914227789450453,
    "grad_s_00": 0.23973417232196284,
    "grad_conv_0000": -0.00038440012146177815,
}


class Head(nn.Module):
    """A stand-in model: only its classifier (`fc`) is read by SRD."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc


def linear(weight, bias) -> nn.Linear:
    weight, bias = torch.as_tensor(weight, dtype=torch.float64), torch.as_tensor(bias, dtype=torch.float64)
    fc = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return fc


def built(s: torch.Tensor, t: torch.Tensor, fc: nn.Linear, teacher_logits=None, **kwargs):
    """SRD on layer "a" of both sides, built; returns the loss and the two Outputs."""
    srd = SRD(student_layers=["a"], teacher_layers=["a"], **kwargs)
    logits = fc(as_vector(t)).detach() if teacher_logits is None else teacher_logits
    student = Outputs(torch.zeros(s.shape[0], fc.out_features, dtype=s.dtype), {"a": s})
    source = Outputs(logits, {"a": t}, model=Head(fc))
    srd.build(student, source)
    return srd.double(), student, source


def as_vector(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x


def identity_connector_(srd: SRD) -> None:
    """Identity conv; BN in eval mode (running mean 0, var 1) with eps 0 is then x; ReLU follows."""
    with torch.no_grad():
        conv = srd.connector.conv
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
    srd.connector.bn.eval()
    srd.connector.bn.eps = 0.0


# A head that reads 2 features into 3 classes: z = (h1, h2, h1 + h2).
W3 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_srd_by_hand():
    # h_S = [1, 2] (non-negative, so the ReLU passes it), h_T = [0, 2]; z_T = W h_T = [0, 2, 2],
    # W h_S = [1, 2, 3]. L_FM = mean((1-0)^2, 0) = 1/2, L_SR = mean(1, 0, 1) = 2/3.
    s = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    srd, student, source = built(s, t, linear(W3, [0.0, 0.0, 0.0]))
    identity_connector_(srd)
    assert srd(student, source, {}).item() == pytest.approx(0.5 + 2 / 3, rel=1e-12)
    srd.feature_weight, srd.sr_weight = 2.0, 3.0
    assert srd(student, source, {}).item() == pytest.approx(2 * 0.5 + 3 * 2 / 3, rel=1e-12)


def test_the_softmax_form_by_hand():
    # sr_loss: kl at T=2 on the same numbers: T^2 * KL(softmax(z_T / T) || softmax(W h_S / T)).
    s = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    srd, student, source = built(s, t, linear(W3, [0.0, 0.0, 0.0]), sr_loss="kl", temperature=2.0)
    identity_connector_(srd)
    z_t, z_s = [0.0, 2.0, 2.0], [1.0, 2.0, 3.0]
    p = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_t) for v in z_t]
    q = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_s) for v in z_s]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert srd(student, source, {}).item() == pytest.approx(0.5 + 4 * kl, rel=1e-12)


def test_zero_when_the_students_feature_is_the_teachers_and_only_the_heads_view_counts_for_l_sr():
    torch.manual_seed(0)
    t = torch.rand(5, 4, dtype=torch.float64)
    fc = linear(torch.randn(3, 4), torch.randn(3))
    srd, student, source = built(t.clone(), t, fc)
    identity_connector_(srd)
    assert srd(student, source, {}).item() == pytest.approx(0, abs=1e-12)
    # A feature moved along the head's null space: the same logits, so L_SR is still 0; L_FM is not.
    head = linear([[1.0, -1.0, 0.0, 0.0]], [0.5])
    moved = t + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    srd, student, source = built(moved, t, head, sr_weight=1.0, feature_weight=0.0)
    identity_connector_(srd)
    assert srd(student, source, {}).item() == pytest.approx(0, abs=1e-12)
    srd.feature_weight = 1.0
    assert srd(student, source, {}).item() == pytest.approx(0.5, rel=1e-12)  # mean of (1, 1, 0, 0)


def seeded_maps():
    g = torch.Generator().manual_seed(0)
    feat_s = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    feat_t = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    conv = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    fc = linear(
        torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    )
    return feat_s, feat_t, conv, fc


def seeded_vectors():
    g = torch.Generator().manual_seed(0)
    emb_s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    emb_t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    conv = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    fc = linear(
        torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    )
    return emb_s, emb_t, conv, fc


@pytest.mark.parametrize("inputs, expected", [(seeded_maps, AUTHORS), (seeded_vectors, SIMKD)])
def test_matches_the_anchors_code(inputs, expected):
    s, t, conv, fc = inputs()
    srd, student, source = built(s, t, fc)
    with torch.no_grad():
        srd.connector.conv.weight.copy_(conv)
    loss = srd(student, source, {})
    loss.backward()
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    grad_s = s.grad[0, 0, 0, 0] if s.ndim == 4 else s.grad[0, 0]
    assert grad_s.item() == pytest.approx(expected.get("grad_s_0000", expected.get("grad_s_00")), rel=1e-5)
    assert srd.connector.conv.weight.grad[0, 0, 0, 0].item() == pytest.approx(
        expected["grad_conv_0000"], rel=1e-5
    )
    assert fc.weight.grad is None and fc.bias.grad is None  # the teacher's head is read, never trained


# ---------------------------------------------------------------------------- in the schemes
def model(name: str) -> nn.Module:
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


def test_online_srd_reads_the_peers_live_head_without_training_it():
    torch.manual_seed(0)
    scheme = Online(student=model("resnet8"), teacher=model("resnet14"), knowledge={"srd": SRD()}, **common())
    data = batch()
    outputs = scheme.forward_peers(data["input"])
    term = scheme.knowledge["student"]["teacher"]["srd"]
    term(
        outputs["student"], scheme.source_outputs(outputs, "teacher"), data, scheme.loss_context()
    ).backward()
    assert all(p.grad is None for p in scheme.peers["teacher"].parameters())
    assert sum(p.grad.abs().sum() for p in scheme.peers["student"].parameters() if p.grad is not None) > 0
    assert all(p.grad is not None for p in term.connector.parameters())


def test_bad_settings_and_pairs_it_cannot_handle_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge.srd.sr_loss='ce' is not one of mse, kl"):
        SRD(sr_loss="ce")
    with pytest.raises(KdlabError, match=r"knowledge.srd.temperature=0"):
        SRD(temperature=0)
    with pytest.raises(KdlabError, match=r"\(SRD\) distils one representation"):
        SRD(student_layers=["stage2", "stage3"], teacher_layers=["stage2", "stage3"])
    # The teacher's stage2 (32 channels) is not what its classifier (64 features) reads.
    with pytest.raises(KdlabError, match=r"classifier, which reads 64 features"):
        Offline(
            teacher=model("resnet14"),
            student=model("resnet8"),
            knowledge={"srd": SRD(student_layers=["stage2"], teacher_layers=["stage2"])},
            **common(),
        )
    # BYOT's exits carry no model whose classifier SRD could use.
    with pytest.raises(KdlabError, match=r"knowledge.srd \(SRD\) .* source carries no model.*mode=byot"):
        BYOT(student=model("resnet8"), knowledge={"srd": SRD()}, **common())
    # An ensemble of peers has no features (and no classifier).
    with pytest.raises(KdlabError, match=r"mode.target=ensemble .* knowledge.srd reads \['embedding'\]"):
        Online(
            student=model("resnet8"),
            teacher=model("resnet14"),
            knowledge={"srd": SRD()},
            target="ensemble",
            **common(),
        )
    # A 3-D feature is neither an embedding nor a map.
    # Tokens that are no patch grid (kdlab/knowledge/layouts.py; a grid would become a map).
    with pytest.raises(KdlabError, match=r"The student's 'a' is a sequence of 3 tokens of width 4"):
        built(
            torch.zeros(2, 3, 4, dtype=torch.float64),
            torch.zeros(2, 2, dtype=torch.float64),
            linear(W3, [0, 0, 0]),
        )
