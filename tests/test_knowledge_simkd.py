"""SimKD (kdlab.knowledge.simkd): the loss, the deployed student, and where it cannot work."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import KdlabError
from kdlab.knowledge.simkd import SimKD, SimKDStudent
from kdlab.models import create_model, load_weights
from kdlab.schemes import Offline, Online
from kdlab.taps import Outputs
from tests.conftest import NO_PLOTS, cli_overrides, run_main

# DefangChen/SimKD, commit 2b389c3, models/util.py: SimKD(s_n=6, t_n=10, factor=2) in eval mode on
# the inputs of `anchor_inputs()` (its convolutions' weights drawn there too), float64:
# MSE(trans_feat_s, trans_feat_t) and pred_feat_s (the teacher classifier's logits of the student).
ANCHOR_LOSS = 0.4452461812379693
ANCHOR_PRED = [
    -0.6781669868,
    0.5058488555,
    0.181315904,
    -2.0367310443,
    0.0504505132,
    -0.7460929892,
    0.4927387481,
    0.214057835,
    -2.0593502268,
    0.011917663,
    -0.6689982753,
    0.5562030932,
    0.2380090436,
    -2.134590346,
    -0.0172804656,
    -0.6970275767,
    0.586973827,
    0.2651338386,
    -2.1911217761,
    -0.0397175702,
]


def anchor_inputs():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64).relu()
    ft = torch.randn(4, 10, 4, 4, generator=g, dtype=torch.float64).relu()
    head = nn.Linear(10, 5).double().requires_grad_(False)
    head.weight.copy_(torch.randn(5, 10, generator=g, dtype=torch.float64))
    head.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return g, fs, ft, head


class HeadOnly(nn.Module):
    """A stand-in teacher: only its classifier matters to SimKD."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc


def test_loss_and_teacher_classifier_predictions_match_the_authors_code():
    g, fs, ft, head = anchor_inputs()
    loss = SimKD(student_layers=["s"], teacher_layers=["t"])
    student, source = (
        Outputs(torch.zeros(4, 5), {"s": fs}),
        Outputs(torch.zeros(4, 5), {"t": ft}, model=HeadOnly(head)),
    )
    loss.build(student, source)
    loss.double().eval()
    with torch.no_grad():
        for conv in (m for m in loss.projector if isinstance(m, nn.Conv2d)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 0.3)
    torch.testing.assert_close(
        loss(student, source, {}), torch.tensor(ANCHOR_LOSS, dtype=torch.float64), rtol=1e-5, atol=0
    )
    # The deployed student's prediction: pooled projection through the teacher's classifier.
    projected = loss.projector(F.adaptive_avg_pool2d(fs, 4))
    pred = head(projected.mean(dim=(2, 3)))
    torch.testing.assert_close(
        pred.flatten(), torch.tensor(ANCHOR_PRED, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )


def test_loss_by_hand_is_the_mean_squared_error_of_the_projection():
    loss = SimKD(student_layers=["s"], teacher_layers=["t"])
    s, t = torch.rand(2, 3, 4, 4), torch.rand(2, 8, 2, 2)
    head = HeadOnly(nn.Linear(8, 3).requires_grad_(False))
    loss.build(Outputs(torch.zeros(2, 3), {"s": s}), Outputs(torch.zeros(2, 3), {"t": t}, model=head))
    projected = loss.projector(F.avg_pool2d(s, 2))  # the 4x4 student map pooled to the teacher's 2x2
    expected = ((projected - t) ** 2).sum() / projected.numel()
    torch.testing.assert_close(
        loss(Outputs(torch.zeros(2, 3), {"s": s}), Outputs(torch.zeros(2, 3), {"t": t}), {}), expected
    )


def offline(**kwargs):
    teacher = create_model("resnet14", num_classes=10, in_channels=1, input_size=28)
    student = create_model("resnet8", num_classes=10, in_channels=1, input_size=28)
    scheme = Offline(
        teacher=teacher,
        student=student,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        input_shape=(1, 28, 28),
        knowledge={"simkd": SimKD(**kwargs)},
        num_samples=100,
    )
    return scheme, teacher, student


def test_the_deployed_student_is_backbone_projector_and_the_teachers_real_classifier():
    torch.manual_seed(0)
    scheme, teacher, student = offline()
    deployed = scheme.deployable()
    assert isinstance(deployed, SimKDStudent)
    assert deployed.head is teacher.fc and deployed.backbone is student  # the real modules, not copies
    assert deployed.projector is scheme.knowledge["simkd"].projector
    assert scheme.models()["student"] is deployed and scheme.forward is not None
    assert scheme.deployed_architecture("resnet8") == "resnet8 + simkd projector + teacher's classifier"
    x = torch.randn(3, 1, 28, 28)
    deployed.eval()
    with torch.no_grad():
        feature = scheme.student_tap(x).feats["stage3"]
        expected = teacher.fc(scheme.knowledge["simkd"].projector(feature).mean(dim=(2, 3)))
        torch.testing.assert_close(deployed(x), expected)
    # A training step moves the student and the projector, never the teacher's classifier.
    batch = {"input": x, "target": torch.tensor([1, 2, 3]), "index": torch.arange(3)}
    deployed.train()
    scheme.weighted_sum(scheme.loss_terms(scheme.student_tap(x), scheme.sources(x, batch), batch)).backward()
    assert teacher.fc.weight.grad is None
    assert all(p.grad is not None for p in scheme.knowledge["simkd"].projector.parameters())
    assert scheme.task_weight == 0.0


def test_simkd_refuses_a_source_whose_classifier_learns():
    peers = dict(
        student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
        teacher=create_model("resnet14", num_classes=10, in_channels=1, input_size=28),
    )
    with pytest.raises(KdlabError, match="must stay fixed.*mode=offline"):
        Online(
            **peers,
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"simkd": SimKD()},
            num_samples=100,
        )
    with pytest.raises(KdlabError, match="knowledge.simkd.factor"):
        SimKD(factor=0)
    with pytest.raises(KdlabError, match="one layer of each model"):
        offline(student_layers=["stages"])


def test_simkd_trains_through_the_cli_and_saves_the_deployed_student(tmp_path, fashion_mnist, teacher_store):
    overrides = cli_overrides(tmp_path, 2, teacher_store)
    proc = run_main(
        [*overrides, "knowledge=simkd", "model@teacher=resnet14", "model@student=resnet8", NO_PLOTS],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "metrics.json").read_text())
    row = next(r for r in result["models"] if r["model"] == "student")
    assert row["architecture"] == "resnet8 + simkd projector + teacher's classifier"
    saved = torch.load(run / "student.pt", weights_only=True)
    assert saved["architecture"] == row["architecture"] and saved["deployed"] is True
    # Not the weights of the student's architecture (its own classifier never trained): refused as such.
    with pytest.raises(KdlabError, match="holds a deployed student"):
        load_weights(
            create_model("resnet8", num_classes=10, in_channels=1, input_size=28), run / "student.pt"
        )
    assert any(k.startswith("head.") for k in saved["state_dict"]) and any(
        k.startswith("projector.") for k in saved["state_dict"]
    )
    # The saved deployed model, rebuilt by hand, gives the reported test accuracy's ingredients.
    assert row["params"] == sum(
        v.numel()
        for k, v in saved["state_dict"].items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
