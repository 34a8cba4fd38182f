"""ICKD (inter-channel correlation): by hand, its invariances, the authors' numbers, and the layers
it refuses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.knowledge.ickd import ICKD
from kdlab.models import create_model
from kdlab.schemes import BYOT, Offline
from kdlab.taps import Outputs

# Reference values: the authors' CIFAR-100 code, github.com/ADLab-AutoDrive/ICKD @
# 403b8d3d7c3aaa429e4708870d2be1d4daf92f07, Cifar100/distiller_zoo/ICKD.py `ICKDLoss` (s_dim 4,
# feat_dim 6) with `sum(loss_group)` as in Cifar100/helper/loops.py, run once on the inputs of
# `seeded` below in float64, its `embed_s` conv weight copied and its BatchNorm in training mode.
REFERENCE = {
    "loss": 0.8716031124818673,
    "grad_s_0000": 0.00323719429068121,
    "grad_conv_0000": 0.0030497002338368134,
}


def built(s: torch.Tensor, t: torch.Tensor, **kwargs) -> tuple[ICKD, Outputs, Outputs]:
    ickd = ICKD(student_layers=["a"], teacher_layers=["a"], **kwargs)
    student, source = (
        Outputs(torch.zeros(s.shape[0], 2), {"a": s}),
        Outputs(torch.zeros(t.shape[0], 2), {"a": t}),
    )
    ickd.build(student, source)
    return ickd.double(), student, source


def identity_embed_(ickd: ICKD) -> None:
    """Identity 1x1 conv; BN in eval mode (running mean 0, var 1) with eps 0 is then exactly x."""
    embed = ickd.embeds[0]
    with torch.no_grad():
        embed.conv.weight.copy_(torch.eye(embed.conv.out_channels, embed.conv.in_channels)[:, :, None, None])
    embed.bn.eval()
    embed.bn.eps = 0.0


def loss_of(s: torch.Tensor, t: torch.Tensor) -> float:
    ickd, student, source = built(s, t)
    identity_embed_(ickd)
    return ickd(student, source, {}).item()


def test_ickd_by_hand_on_two_channels():
    # Student channels [1, 0] and [0, 1] over two positions: G = I, rows already unit.
    # Teacher channels [1, 1] and [1, 1]: G = [[2, 2], [2, 2]], rows [1, 1] / sqrt(2).
    # Squared distance: 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2, divided by C * B = 2.
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    t = torch.ones(1, 2, 1, 2, dtype=torch.float64)
    assert loss_of(s, t) == pytest.approx(2 - math.sqrt(2), rel=1e-12)


def test_ickd_averages_over_the_batch_and_sums_layer_pairs():
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    t = torch.ones(1, 2, 1, 2, dtype=torch.float64)
    # A second sample where student == teacher adds 0 and halves the mean.
    assert loss_of(torch.cat([s, t]), torch.cat([t, t])) == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-12)
    two = ICKD(student_layers=["a", "b"], teacher_layers=["a", "b"])
    student, source = (
        Outputs(torch.zeros(1, 2), {"a": s, "b": s}),
        Outputs(torch.zeros(1, 2), {"a": t, "b": t}),
    )
    two.build(student, source)
    two.double()
    for embed in two.embeds:
        with torch.no_grad():
            embed.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        embed.bn.eval()
        embed.bn.eps = 0.0
    assert two(student, source, {}).item() == pytest.approx(2 * (2 - math.sqrt(2)), rel=1e-12)


def test_the_correlation_ignores_where_things_are_and_how_large_they_are():
    # The paper's point: G is channel x channel, so positions (their order, their number) do not enter,
    # and each row is normalised, so a positive scale of a map does not either.
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    base = loss_of(s, t)
    assert base > 0
    shuffled = t.flatten(2)[:, :, torch.randperm(9)].view_as(t)
    assert loss_of(s, shuffled) == pytest.approx(base, rel=1e-10)
    assert loss_of(s, 3.7 * t) == pytest.approx(base, rel=1e-10)
    assert loss_of(0.2 * s, t) == pytest.approx(base, rel=1e-10)
    # The same permutation of channels on both sides permutes both matrices alike.
    order = torch.randperm(4)
    assert loss_of(s[:, order], t[:, order]) == pytest.approx(base, rel=1e-10)
    assert loss_of(t.clone(), t) == pytest.approx(0, abs=1e-12)


def seeded():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 6, 3, 3, generator=g, dtype=torch.float64)
    conv = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64)
    return f_s, f_t, conv


def test_matches_the_authors_code():
    f_s, f_t, conv = seeded()
    ickd, student, source = built(f_s, f_t)
    with torch.no_grad():
        ickd.embeds[0].conv.weight.copy_(conv)
    loss = ickd(student, source, {})
    loss.backward()
    assert loss.item() == pytest.approx(REFERENCE["loss"], rel=1e-5)
    assert f_s.grad[0, 0, 0, 0].item() == pytest.approx(REFERENCE["grad_s_0000"], rel=1e-5)
    assert ickd.embeds[0].conv.weight.grad[0, 0, 0, 0].item() == pytest.approx(
        REFERENCE["grad_conv_0000"], rel=1e-5
    )


# ---------------------------------------------------------------------------- in the schemes
def model(name: str):
    return create_model(name, num_classes=10, in_channels=1, input_size=28)


def common() -> dict:
    return dict(
        optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=10, input_shape=(1, 28, 28), num_samples=64
    )


def test_byot_exits_learn_the_deepest_exits_correlations():
    torch.manual_seed(0)
    scheme = BYOT(student=model("resnet8"), knowledge={"ickd": ICKD()}, **common())
    scheme.log_terms = lambda terms, loss: None
    g = torch.Generator().manual_seed(0)
    data = {
        "input": torch.randn(8, 1, 28, 28, generator=g),
        "target": torch.arange(8) % 10,
        "index": torch.arange(8),
    }
    scheme.training_step(data, 0).backward()
    for terms in scheme.knowledge.values():
        assert all(p.grad is not None for p in terms["ickd"].embeds.parameters())


def test_bad_settings_and_layers_it_cannot_handle_are_explained():
    with pytest.raises(KdlabError, match=r"knowledge.ickd.weight=-1"):
        ICKD(weight=-1)
    with pytest.raises(KdlabError, match=r"knowledge.ickd.layer_reduction"):
        ICKD(layer_reduction="max")
    # The pooled embedding has no positions to correlate channels over.
    with pytest.raises(
        KdlabError, match=r"student's layer 'embedding' \(2, 64, 1, 1\) has a single position"
    ):
        Offline(
            teacher=model("resnet14"),
            student=model("resnet8"),
            knowledge={"ickd": ICKD(student_layers=["embedding"], teacher_layers=["embedding"])},
            **common(),
        )
    with pytest.raises(KdlabError, match=r"needs \(batch, channels, height, width\) maps"):
        built(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
