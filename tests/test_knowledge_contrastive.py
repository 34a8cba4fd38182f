"""CRD: the NCE loss by hand, the memory bank keyed by sample index, and where gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.knowledge import CRD, LossContext, contrastive
from kdlab.knowledge.contrastive import nce_loss
from kdlab.taps import Outputs


def built_crd(num_samples=50, s_dim=6, t_dim=10, **kwargs) -> CRD:
    crd = CRD(feat_dim=4, num_negatives=8, **kwargs)
    crd.build(
        Outputs(torch.zeros(2, 3), {"embedding": torch.zeros(2, s_dim, 1, 1)}),
        Outputs(torch.zeros(2, 3), {"embedding": torch.zeros(2, t_dim, 1, 1)}),
        LossContext(num_samples=num_samples),
    )
    return crd


def test_nce_loss_by_hand():
    # One sample, K=2 negatives, N=10: noise K*Pn = 0.2.
    # -[log(0.5/(0.5+0.2)) + log(0.2/(0.1+0.2)) + log(0.2/(0.2+0.2))]
    expected = -(math.log(0.5 / 0.7) + math.log(0.2 / 0.3) + math.log(0.2 / 0.4))
    assert nce_loss(torch.tensor([[0.5, 0.1, 0.2]]), num_samples=10).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_banks_are_sized_by_the_training_split_and_unit_scaled():
    crd = built_crd(num_samples=50)
    assert crd.memory_student.shape == (50, 4) and crd.memory_teacher.shape == (50, 4)
    stdv = 1 / math.sqrt(4 / 3)
    assert crd.memory_student.abs().max() <= stdv


def test_positives_bank_rows_move_toward_the_new_embeddings_with_momentum():
    torch.manual_seed(0)
    crd = built_crd(momentum=0.5)
    index = torch.tensor([3, 7])
    student = Outputs(torch.zeros(2, 3), {"embedding": torch.randn(2, 6, 1, 1)})
    teacher = Outputs(torch.zeros(2, 3), {"embedding": torch.randn(2, 10, 1, 1)})
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    v_s = F.normalize(crd.embed_student(student.feats["embedding"].flatten(1)), dim=1).detach()
    v_t = F.normalize(crd.embed_teacher(teacher.feats["embedding"].flatten(1)), dim=1).detach()
    crd(student, teacher, {"index": index})
    expected_s = F.normalize(before_s[index] * 0.5 + v_s * 0.5, dim=1)
    expected_t = F.normalize(before_t[index] * 0.5 + v_t * 0.5, dim=1)
    assert torch.allclose(crd.memory_student[index], expected_s, atol=1e-6)
    assert torch.allclose(crd.memory_teacher[index], expected_t, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crd.memory_student[untouched], before_s[untouched])


def test_normaliser_is_estimated_once_then_kept():
    torch.manual_seed(0)
    crd = built_crd()
    batch = {"index": torch.tensor([0, 1])}
    feats = lambda d: Outputs(torch.zeros(2, 3), {"embedding": torch.randn(2, d, 1, 1)})  # noqa: E731
    assert (crd.normalizers < 0).all()
    crd(feats(6), feats(10), batch)
    first = crd.normalizers.clone()
    assert (first > 0).all()
    crd(feats(6), feats(10), batch)
    assert torch.equal(crd.normalizers, first)


def test_gradients_reach_the_student_and_both_heads_only():
    crd = built_crd()
    s = torch.randn(2, 6, 1, 1, requires_grad=True)
    t = torch.randn(2, 10, 1, 1, requires_grad=True)
    loss = crd(
        Outputs(torch.zeros(2, 3), {"embedding": s}),
        Outputs(torch.zeros(2, 3), {"embedding": t.detach()}),
        {"index": torch.tensor([4, 5])},
    )
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert crd.embed_student.weight.grad.abs().sum() > 0 and crd.embed_teacher.weight.grad.abs().sum() > 0


def test_crd_without_the_split_size_or_with_several_layers_is_refused():
    crd = CRD()
    with pytest.raises(KdlabError, match="size of the training split"):
        crd.build(
            Outputs(torch.zeros(2, 3), {"embedding": torch.zeros(2, 4)}),
            Outputs(torch.zeros(2, 3), {"embedding": torch.zeros(2, 4)}),
        )
    with pytest.raises(KdlabError, match="one embedding per model"):
        CRD(student_layers=["stage1", "stage2"])


def test_the_whole_bank_product_equals_the_reference_gather(monkeypatch):
    # The two ways to get each sample's (K+1) dot products give the same loss, gradients and banks.
    def run(ratio):
        monkeypatch.setattr(contrastive, "FULL_PRODUCT_RATIO", ratio)
        torch.manual_seed(0)
        crd = built_crd(num_samples=200)
        student = torch.randn(6, 6, 1, 1, requires_grad=True)
        outputs = Outputs(torch.zeros(6, 3), {"embedding": student})
        source = Outputs(torch.zeros(6, 3), {"embedding": torch.randn(6, 10, 1, 1)})
        losses = []
        for step in range(2):  # the second step reads banks the first one wrote
            torch.manual_seed(step)
            losses.append(crd(outputs, source, {"index": torch.arange(6) + 6 * step}))
        sum(losses).backward()
        return (
            torch.stack(losses).detach(),
            student.grad,
            crd.memory_student.clone(),
            crd.embed_student.weight.grad,
        )

    product, gather = run(16), run(0)  # N=200 <= 16 * 9 draws: the product; ratio 0: the gather
    for a, b in zip(product, gather, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
