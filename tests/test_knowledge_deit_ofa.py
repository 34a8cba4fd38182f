"""DeiT's distillation token (`knowledge=deit`, `deit_soft`) and OFA-KD (`knowledge=ofa`).

Each loss is checked against values computed by hand here and against its authors' code, run once
outside this repository on the same tensors (the reference values below); then through real runs:
DeiT's three test rows recomputed from the saved student, and OFA's branches as the paper builds them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.knowledge.deit import DeiT
from kdlab.knowledge.ofa import OFA, SeparableDown, TokenHead, branch_depth, ofa_loss
from kdlab.models import create_model
from kdlab.run import train
from tests.conftest import NO_PLOTS, compose_config, fast_overrides
from tests.test_metrics_recomputed import loader_batches

STUDENT = torch.tensor(
    [[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -0.4, 1.5], [-2.0, 1.0, 3.0, 0.5]], dtype=torch.float64
)
DISTILLATION = torch.tensor(
    [[1.0, 0.5, 0.0, -0.5], [0.0, 1.0, 0.2, 0.3], [0.5, -1.0, 2.0, 0.0]], dtype=torch.float64
)
TEACHER = torch.tensor(
    [[1.0, 0.0, 2.0, -1.0], [0.5, 2.5, -0.5, 0.0], [0.0, 0.0, 4.0, 1.0]], dtype=torch.float64
)
LABELS = torch.tensor([0, 1, 2])
TINY_VIT = ["+student.depth=2", "+student.embed_dim=32", "+student.num_heads=2", "+student.patch_size=4"]

# The authors' ofa_loss (github:Hao840/OFAKD distillers/ofa.py @12eeba8) on STUDENT, TEACHER, LABELS.
OFA_REFERENCE = {
    (1.0, 1.0): 1.2805083138864004,
    (1.5, 1.0): 1.405613175500055,
    (1.0, 4.0): 1.3697855118302413,
}
# DeiT's DistillationLoss (github:facebookresearch/deit losses.py; soft: @0ed0277, which divides the KL's
# sum by batch x classes; hard: its first release), class head STUDENT, distillation head DISTILLATION.
DEIT_REFERENCE = {("soft", 0.1, 3.0): 0.7282149083252547, ("hard", 0.5, 1.0): 0.892902949616551}


def outputs(class_logits=STUDENT, distillation_logits=DISTILLATION):
    from kdlab.taps import Outputs

    return Outputs(class_logits, {"class_head": class_logits, "distillation_head": distillation_logits})


# --------------------------------------------------------------------------------------- DeiT
def test_hard_deit_is_half_ce_to_the_label_and_half_ce_to_the_teachers_class():
    loss = DeiT(variant="hard", mix=0.5)(outputs(), outputs(TEACHER), {"target": LABELS})
    by_hand = 0.0
    for cls, dist, teacher, label in zip(STUDENT, DISTILLATION, TEACHER, LABELS, strict=True):
        by_hand += -0.5 * math.log(cls.softmax(0)[label]) - 0.5 * math.log(dist.softmax(0)[teacher.argmax()])
    assert loss.item() == pytest.approx(by_hand / 3, rel=1e-12)
    assert loss.item() == pytest.approx(DEIT_REFERENCE[("hard", 0.5, 1.0)], rel=1e-12)


def test_soft_deit_matches_the_paper_and_with_elementwise_reduction_the_authors_code():
    batchmean = DeiT(variant="soft", mix=0.1, temperature=3.0)(
        outputs(), outputs(TEACHER), {"target": LABELS}
    )
    elementwise = DeiT(variant="soft", mix=0.1, temperature=3.0, reduction="elementwise")(
        outputs(), outputs(TEACHER), {"target": LABELS}
    )
    ce = F.cross_entropy(STUDENT, LABELS).item()
    p_t, p_s = (TEACHER / 3).softmax(1), (DISTILLATION / 3).softmax(1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean().item()  # Eq. 2's KL, per sample
    assert batchmean.item() == pytest.approx(0.9 * ce + 0.1 * 9 * kl, rel=1e-12)
    assert elementwise.item() == pytest.approx(DEIT_REFERENCE[("soft", 0.1, 3.0)], rel=1e-12)
    assert elementwise.item() == pytest.approx(0.9 * ce + 0.1 * 9 * kl / 4, rel=1e-12)  # C = 4 classes


def test_deit_trains_the_class_head_on_labels_and_the_distillation_head_on_the_teacher():
    cls = STUDENT.clone().requires_grad_()
    dist = DISTILLATION.clone().requires_grad_()
    DeiT(variant="hard", mix=1.0)(outputs(cls, dist), outputs(TEACHER), {"target": LABELS}).backward()
    assert cls.grad.abs().sum() == 0 and dist.grad.abs().sum() > 0  # mix 1: the teacher alone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "medium"}, r"knowledge.deit.variant='medium' is not a DeiT variant"),
        ({"mix": 1.5}, r"knowledge.deit.mix=1.5: .* lies in \[0, 1\]"),
        ({"reduction": "sum"}, r"knowledge.deit.reduction='sum'"),
        ({"student_layers": ["class_head"]}, r"DeiT reads two heads"),
    ],
)
def test_bad_deit_settings_name_the_key(options, message):
    with pytest.raises(KdlabError, match=message):
        DeiT(**options)


def test_a_student_without_a_distillation_token_is_refused_with_what_to_use():
    with pytest.raises(KdlabError, match=r"has no distillation token.*timm/deit_tiny_distilled_patch16_224"):
        DeiT().check_model(create_model("lightnn", 10, 1, 28), "student", "student")


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory, fashion_mnist, teacher_store):
    tmp_path = tmp_path_factory.mktemp("deit")
    overrides = [
        *fast_overrides(tmp_path, batches=3, teacher_store=teacher_store),
        "knowledge=deit",
        "model@student=timm/deit_tiny_distilled_patch16_224",
        *TINY_VIT,
        "data.batch_size=64",
        "trainer.limit_test_batches=2",
        NO_PLOTS,
    ]
    return compose_config(overrides), train(compose_config(overrides))


def test_deits_report_shows_the_class_head_the_distillation_head_and_their_average(deit_run):
    cfg, results = deit_run
    rows = {row["model"]: row for row in results["models"]}
    assert rows["student_class_head"]["architecture"] == "timm/deit_tiny_distilled_patch16_224, class head"
    assert "student_distillation_head" in rows
    # Recomputed from student.pt: each head by hand from the tokens, and the student as their average.
    student = create_model(
        "timm/deit_tiny_distilled_patch16_224",
        10,
        1,
        28,
        checkpoint=results["student_weights"],
        depth=2,
        embed_dim=32,
        num_heads=2,
        patch_size=4,
    ).eval()
    correct = {"class": 0, "distillation": 0, "average": 0}
    total = 0
    with torch.no_grad():
        for x, y in loader_batches(cfg, "test", 2):
            tokens = student.forward_features(x)
            cls, dist = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
            for name, logits in (("class", cls), ("distillation", dist), ("average", (cls + dist) / 2)):
                correct[name] += int((logits.argmax(1) == y).sum())
            total += len(y)
    written = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())["metrics"]
    assert written["test/student_class_head/top1"] == pytest.approx(correct["class"] / total, abs=1e-6)
    assert written["test/student_distillation_head/top1"] == pytest.approx(
        correct["distillation"] / total, abs=1e-6
    )
    assert written["test/student/top1"] == pytest.approx(correct["average"] / total, abs=1e-6)


def test_soft_deit_runs_and_reports_its_heads(tmp_path, fashion_mnist, teacher_store):
    overrides = [
        *fast_overrides(tmp_path, batches=2, teacher_store=teacher_store),
        "knowledge=deit_soft",
        "model@student=timm/deit_tiny_distilled_patch16_224",
        *TINY_VIT,
        NO_PLOTS,
    ]
    results = train(compose_config(overrides))
    assert {"student", "student_class_head", "student_distillation_head"} <= {
        r["model"] for r in results["models"]
    }


# ---------------------------------------------------------------------------------------- OFA
@pytest.mark.parametrize(("eps", "temperature"), sorted(OFA_REFERENCE))
def test_ofa_loss_matches_the_authors_code(eps, temperature):
    loss = ofa_loss(STUDENT, TEACHER, LABELS, eps, temperature)
    assert loss.item() == pytest.approx(OFA_REFERENCE[(eps, temperature)], rel=1e-12)


def test_ofa_loss_by_hand():
    eps = 1.5
    by_hand = 0.0
    for s, t, y in zip(STUDENT, TEACHER, LABELS, strict=True):
        p_s, p_t = s.softmax(0), t.softmax(0)
        for c in range(4):
            p = float(p_t[c])
            weight = (p + 1) ** eps - 1 if c == y else p**eps
            by_hand -= weight * math.log(float(p_s[c]))
    assert ofa_loss(STUDENT, TEACHER, LABELS, eps).item() == pytest.approx(by_hand / 3, rel=1e-12)


def test_ofa_with_eps_one_is_cross_entropy_to_the_teachers_distribution():
    soft_ce = -(TEACHER.softmax(1) * STUDENT.log_softmax(1)).sum(1).mean()
    assert ofa_loss(STUDENT, TEACHER, LABELS, 1.0).item() == pytest.approx(soft_ce.item(), rel=1e-12)


def test_ofa_with_eps_above_one_enhances_the_target_and_damps_the_other_classes():
    # Against KD's weights p_t: the target's (1 + p)^eps - 1 is larger, another class's p^eps smaller.
    eps = 1.5
    for p in (0.05, 0.3, 0.9):
        assert (1 + p) ** eps - 1 > eps * p > p
        assert p**eps < p


def test_ofa_picks_at_most_four_stages_evenly_from_the_last():
    ofa = OFA()
    vit = ofa.with_layers([f"stage{i}" for i in range(1, 13)], ["embedding"])
    assert vit.student_layers == ("stage3", "stage6", "stage9", "stage12")  # the authors' ViT stages
    resnet = ofa.with_layers([f"stage{i}" for i in range(1, 6)], ["embedding"])  # stem + 4 stages
    assert resnet.student_layers == ("stage2", "stage3", "stage4", "stage5")
    assert [branch_depth(i, 4) for i in range(4)] == [3, 2, 1, 1]


def test_ofa_builds_a_branch_per_layout_from_the_real_shapes():
    from kdlab.taps import Outputs

    class Tokens(torch.nn.Module):
        num_prefix_tokens = 1

    feats = {
        "map_big": torch.randn(2, 8, 16, 16),
        "map_last": torch.randn(2, 32, 4, 4),
        "tokens": torch.randn(2, 17, 24),
        "vector": torch.randn(2, 40),
    }
    ofa = OFA(student_layers=["tokens", "vector", "map_big", "map_last"])
    student = Outputs(torch.randn(2, 10), feats, model=Tokens())
    teacher = Outputs(torch.randn(2, 10), {"embedding": torch.randn(2, 48)})
    ofa.build(student, teacher)
    tokens, vector, big, last = ofa.branches
    assert isinstance(tokens, TokenHead) and len(tokens.blocks) == 3 and tokens.prefix == 1
    assert isinstance(vector[0], torch.nn.Linear) and vector[0].out_features == 48  # max(32, 48)
    assert [type(m) for m in big[:2]] == [SeparableDown, SeparableDown]  # 16 -> 8 -> 4 px, as the last stage
    assert isinstance(last[0], torch.nn.Conv2d) and last[0].kernel_size == (1, 1)
    for branch, name in zip(ofa.branches, ofa.student_layers, strict=True):
        assert branch(feats[name]).shape == (2, 10)
    loss = ofa(student, teacher, {"target": torch.tensor([1, 2])})
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_ofa_width_is_the_authors_max_the_students_or_a_number():
    from kdlab.taps import Outputs

    student = Outputs(torch.randn(2, 10), {"s": torch.randn(2, 5, 16)}, model=None)
    teacher = Outputs(torch.randn(2, 10), {"embedding": torch.randn(2, 48)})
    for width, expected in (("auto", 48), ("student", 16), (24, 24)):
        ofa = OFA(student_layers=["s"], width=width)
        ofa.build(student, teacher)
        assert ofa.branches[0].classifier.in_features == expected, width
    with pytest.raises(KdlabError, match=r"knowledge.ofa.width='wide'"):
        OFA(width="wide")


def test_bad_ofa_settings_name_the_key():
    with pytest.raises(KdlabError, match=r"knowledge.ofa.eps has 2 values.* give one value, or 3"):
        OFA(eps=[1.0, 1.5], student_layers=["a", "b"]).stage_eps()
    with pytest.raises(KdlabError, match=r"knowledge.ofa.max_stages=0"):
        OFA(max_stages=0)
    with pytest.raises(KdlabError, match=r"knowledge.ofa.eps=-1"):
        OFA(eps=-1)
