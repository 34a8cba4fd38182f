"""DOT (kdlab.optim): the optimizer against the authors' code, and its wiring into the schemes."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kdlab.build import distillation_oriented
from kdlab.errors import KdlabError
from kdlab.knowledge import KD
from kdlab.models import create_model
from kdlab.optim import DOT
from kdlab.schemes import Offline
from tests.conftest import compose_config, fast_overrides

# megvii-research/mdistiller, commit a08d46f, mdistiller/engine/dot.py: DistillationOrientedTrainer
# (momentum 0.9 -/+ 0.075, lr 0.1, no weight decay: see
# test_weight_decay_reaches_an_adapter_from_the_first_step),
# three steps of its documented loop (kd.backward; step_kd; task.backward; step) on `problem()` below,
# float64. Rows: w, b, a.
ANCHOR = [
    [
        -1.062660439738,
        -0.156904777007,
        -0.021838929048,
        -0.354175102899,
        -0.293017775281,
        -0.272771981057,
        0.701662335743,
        0.953896372148,
        0.251956063926,
        -0.173324041448,
        -1.512980762857,
        0.964231942949,
    ],
    [0.215778124049, 0.469240990459, -0.725040038602],
    [
        1.466355370031,
        1.547088729954,
        0.470001458986,
        -0.172815359044,
        -0.261855949413,
        0.05288998443,
        -0.651476982619,
        0.088733047154,
        -0.360657039313,
    ],
]


def problem():
    """A linear classifier (w, b: both losses reach them) and an adapter `a` only distillation reaches."""
    g = torch.Generator().manual_seed(0)
    w, b, a = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((3, 4), (3,), (3, 3)))
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return [torch.nn.Parameter(v.clone()) for v in (w, b, a)], x, y, t


def losses(params, x, y, t):
    w, b, a = params
    logits = x @ w.T + b
    return F.cross_entropy(logits, y), ((logits @ a - t) ** 2).mean()


def test_dot_matches_the_authors_optimizer():
    params, x, y, t = problem()
    optimizer = DOT(params, lr=0.1, momentum=0.9, delta=0.075)
    for _ in range(3):
        task, distill = losses(params, x, y, t)
        optimizer.zero_grad(set_to_none=True)
        optimizer.add_distillation_grads(
            params, torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
        )
        task.backward()
        optimizer.step()
    for p, expected in zip(params, ANCHOR, strict=True):
        torch.testing.assert_close(
            p.detach().flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9
        )


def test_weight_decay_reaches_an_adapter_from_the_first_step():
    # kdlab differs here from the authors' code, which skips weight decay on the first step of a
    # parameter only the distillation loss reaches (its momentum buffer starts from the raw gradient).
    adapter = torch.nn.Parameter(torch.ones(2))
    optimizer = DOT([adapter], lr=0.5, momentum=0.9, delta=0.075, weight_decay=0.1)
    optimizer.add_distillation_grads([adapter], [torch.tensor([1.0, -1.0])])
    optimizer.step()
    # buffer = grad + 0.1 * p = [1.1, -0.9]; p = 1 - 0.5 * buffer
    torch.testing.assert_close(adapter.detach(), torch.tensor([0.45, 1.45]))
    optimizer.add_distillation_grads([adapter], [torch.tensor([1.0, 1.0])])
    optimizer.step()
    # only the distillation loss reaches it, so its momentum is 0.9:
    # buffer = 0.9 * [1.1, -0.9] + [1.045, 1.145]
    torch.testing.assert_close(
        adapter.detach(), torch.tensor([0.45, 1.45]) - 0.5 * torch.tensor([2.035, 0.335])
    )


def test_dot_with_delta_zero_is_sgd_on_the_summed_loss():
    # One momentum for both gradients: the same as SGD with momentum on task + distillation.
    params, x, y, t = problem()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dot = DOT(params, lr=0.1, momentum=0.9, delta=0.0, weight_decay=0.0)
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9)
    for _ in range(3):
        task, distill = losses(params, x, y, t)
        dot.zero_grad(set_to_none=True)
        dot.add_distillation_grads(
            params, torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
        )
        task.backward()
        dot.step()
        sgd.zero_grad()
        sum(losses(reference, x, y, t)).backward()
        sgd.step()
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q)


def test_a_scheme_hands_dot_the_distillation_gradient_and_backpropagates_the_task_loss(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.arange(16) % 10)

    def batches():
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        return [{"input": x, "target": y, "index": torch.arange(8)} for x, y in loader]

    class Batches(torch.utils.data.Dataset):  # already batched: the loader hands each dict over as it is
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return batches()[i]

    def scheme(optimizer):
        torch.manual_seed(1)
        return Offline(
            teacher=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
            student=create_model("resnet8", num_classes=10, in_channels=1, input_size=28),
            optimizer=optimizer,
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"kd": KD()},
            num_samples=16,
        )

    dot_scheme = scheme(partial(DOT, lr=0.05, momentum=0.9, delta=0.075))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(dot_scheme, train_dataloaders=torch.utils.data.DataLoader(Batches(), batch_size=None))
    # The same two steps by hand, as the authors' loop: distillation gradient, then task gradient.
    manual = scheme(None)
    params = manual.trainable_parameters()
    optimizer = DOT(params, lr=0.05, momentum=0.9, delta=0.075)
    for batch in batches():
        student = manual.student_tap(batch["input"])
        terms = manual.loss_terms(student, manual.sources(batch["input"], batch), batch)
        task = manual.task_weight * terms["task"]
        distill = manual.weighted_sum(terms) - task
        optimizer.zero_grad(set_to_none=True)
        optimizer.add_distillation_grads(
            params, torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
        )
        task.backward()
        optimizer.step()
    for (name, p), q in zip(dot_scheme.student.named_parameters(), manual.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_knowledge_dot_selects_sgd_with_dot_and_other_optimizers_are_refused(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "knowledge=dot"])
    factory = distillation_oriented(cfg)
    assert factory.func is DOT and factory.keywords["delta"] == 0.075 and factory.keywords["momentum"] == 0.9
    adam = compose_config([*fast_overrides(tmp_path), "knowledge=kd", "dot.enabled=true"])
    with pytest.raises(KdlabError, match="dot.enabled=true .* optimizer=sgd"):
        distillation_oriented(adam)
    wide = compose_config([*fast_overrides(tmp_path), "knowledge=dot", "dot.delta=0.2"])
    with pytest.raises(KdlabError, match="dot.delta=0.2"):
        distillation_oriented(wide)
