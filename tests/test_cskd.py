"""CS-KD (mode=cskd): the class-wise loss by hand and against the authors' training step, the batches
of same-class pairs (kdlab.data.class_pairs), clear errors, and a CLI run on Fashion-MNIST."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset

from kdlab.build import build_scheme, instantiate, scheme_class
from kdlab.data.class_pairs import ClassPairBatches, class_pair_batches, split_targets
from kdlab.data.datasets import IndexedDataset, collate
from kdlab.errors import KdlabError
from kdlab.schemes import CSKD
from kdlab.schemes.cskd import class_wise_kd
from tests.conftest import NO_PLOTS, cli_overrides, compose_config, fast_overrides, run_main

# The authors' code, github:alinlab/cs-kd at commit b447f250405932501cb28db0dc09eadeab526b80: train.py's
# train() with -cls (KDLoss; cross-entropy on the first half; the second half under no_grad), run once
# outside kdlab on `pair_model()` and `pair_batch()` in float64, two steps of the same batch with lr 0.
REFERENCE = {
    # (temp, lamda): (cls_loss, gradient of the first Linear's weight[0, 0] after the step)
    (4.0, 1.0): (1.037372499113515, -0.004008216759938243),
    (2.0, 3.0): (0.4612484447527785, -0.007824762774371984),
}
REFERENCE_CE = 5.7174743570731685  # their train_loss: the first half's cross-entropy
REFERENCE_BN_RUNNING_MEAN0 = -1.352628043121162  # BatchNorm's running mean after the two steps


def pair_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 12), (6,), (6,), (6,), (5, 6), (5,)]  # Linear, BatchNorm (weight, bias), Linear
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]


def pair_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))


def pair_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 3, 4, generator=g, dtype=torch.float64)
    return {"input": x, "target": torch.tensor([0, 3, 1, 0, 3, 1]), "index": torch.arange(6)}


def cskd(student: nn.Module, **kwargs) -> CSKD:
    scheme = CSKD(
        student=student,
        optimizer=partial(torch.optim.SGD, lr=0.0),
        num_classes=5,
        input_shape=(1, 3, 4),
        **kwargs,
    )
    scheme.log_terms = lambda terms, loss: scheme.__dict__.setdefault("logged", []).append(terms)
    return scheme


# ------------------------------------------------------------------------------------------ the loss
def test_class_wise_term_by_hand():
    z = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    z_pair = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = sum(
        q * math.log(q / p)
        for row, pair in zip(z, z_pair, strict=True)
        for p, q in zip(softmax(row), softmax(pair), strict=True)
    )
    expected = T**2 * kl / len(z)
    got = class_wise_kd(torch.tensor(z, dtype=torch.float64), torch.tensor(z_pair, dtype=torch.float64), T)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    same = torch.tensor(z)
    assert class_wise_kd(same, same.clone(), T).item() == pytest.approx(0.0, abs=1e-7)  # equal predictions


@pytest.mark.parametrize(("temp", "lamda"), list(REFERENCE))
def test_a_step_matches_the_authors_train_step(temp, lamda):
    net = pair_model()
    scheme = cskd(net, temperature=temp, weight=lamda).double().train()
    with torch.no_grad():
        for param, value in zip(net.parameters(), pair_weights(), strict=True):
            param.copy_(value)
    batch = pair_batch()
    for _ in range(2):  # as the reference: two steps of the same batch, nothing updated (lr 0)
        net.zero_grad()
        loss = scheme.training_step(batch, 0)
        loss.backward()
    cls_loss, grad = REFERENCE[temp, lamda]
    terms = scheme.logged[-1]
    assert terms["task"].item() == pytest.approx(REFERENCE_CE, rel=1e-5)
    assert terms["cskd"].item() == pytest.approx(cls_loss, rel=1e-5)
    assert loss.item() == pytest.approx(REFERENCE_CE + lamda * cls_loss, rel=1e-5)
    assert net[1].weight.grad[0, 0].item() == pytest.approx(grad, rel=1e-5)
    # Both halves ran through the model in training mode, each on its own, as in the reference.
    assert net[2].running_mean[0].item() == pytest.approx(REFERENCE_BN_RUNNING_MEAN0, rel=1e-5)


def test_the_partner_is_a_target_only():
    scheme = cskd(pair_model()).double().train()
    batch = pair_batch()
    x = batch["input"].clone().requires_grad_(True)
    scheme.training_step({**batch, "input": x}, 0).backward()
    assert x.grad[:3].abs().sum() > 0 and x.grad[3:].abs().sum() == 0


def test_a_batch_that_is_not_pairs_is_refused():
    scheme = cskd(pair_model()).double().train()
    batch = pair_batch()
    with pytest.raises(KdlabError, match="halves have different labels"):
        scheme.training_step({**batch, "target": torch.tensor([0, 3, 1, 1, 3, 0])}, 0)
    odd = {key: value[:5] for key, value in batch.items()}
    with pytest.raises(KdlabError, match="not pairs"):
        scheme.training_step(odd, 0)


def test_bad_settings_and_knowledge_are_refused(tmp_path):
    with pytest.raises(KdlabError, match=r"^mode.temperature=0: .* e.g. mode.temperature=4"):
        cskd(pair_model(), temperature=0)
    with pytest.raises(KdlabError, match=r"^mode.weight=-1"):
        cskd(pair_model(), weight=-1)
    cfg = compose_config([*fast_overrides(tmp_path), "mode=cskd", "knowledge=kd"])
    with pytest.raises(KdlabError, match="mode=cskd computes its own loss .* knowledge=kd"):
        CSKD.sources_for(cfg, None, None)


def test_mode_cskd_is_its_own_scheme_with_the_papers_recipe(tmp_path):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=cskd"])
    assert scheme_class(cfg) is CSKD and CSKD.name == "cskd"
    assert not cfg.get("knowledge")  # the loss is the scheme's own
    assert (cfg.mode.temperature, cfg.mode.weight) == (4.0, 1.0)


# ------------------------------------------------------------------------------- the pair batches
def pairs_of(batch: list[int]) -> list[tuple[int, int]]:
    half = len(batch) // 2
    return list(zip(batch[:half], batch[half:], strict=True))


TARGETS = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3, 1, 0, 2, 1, 0])  # class 3 has one sample


def sampler(seed=0, epoch=0, batch_size=4) -> ClassPairBatches:
    return class_pair_batches(IndexedDataset(list(range(len(TARGETS))), TARGETS), seed, epoch, batch_size)


def test_every_pair_is_two_samples_of_one_class():
    for epoch in range(5):
        batches = list(sampler(epoch=epoch))
        for batch in batches:
            assert len(batch) % 2 == 0
            for sample, partner in pairs_of(batch):
                assert TARGETS[sample] == TARGETS[partner]
                # Another sample, unless the class has no other one in the split.
                assert (sample != partner) or (TARGETS == TARGETS[sample]).sum() == 1


def test_the_samples_cover_the_split_once_per_epoch():
    batches = list(sampler(batch_size=4))
    assert len(batches) == len(sampler(batch_size=4)) == math.ceil(len(TARGETS) / 4)
    assert [len(b) for b in batches] == [8, 8, 8, 2]  # the authors' layout: B samples, then B partners
    firsts = [sample for batch in batches for sample, _ in pairs_of(batch)]
    assert sorted(firsts) == list(range(len(TARGETS)))


def test_the_batches_are_a_function_of_seed_and_epoch():
    assert list(sampler(seed=3, epoch=2)) == list(sampler(seed=3, epoch=2))
    assert list(sampler(seed=3, epoch=2)) != list(sampler(seed=3, epoch=3))
    assert list(sampler(seed=3, epoch=2)) != list(sampler(seed=4, epoch=2))
    # The partners too, not only the order: the same position pairs differently across epochs.
    draws = {tuple(sampler(epoch=e).partners(e).tolist()) for e in range(6)}
    assert len(draws) > 1
    # Lightning sets the epoch on the batch sampler's `sampler`; a run resumed at epoch 2 draws the same.
    loader = DataLoader(list(range(len(TARGETS))), batch_sampler=sampler(seed=3, epoch=0))
    _set_sampler_epoch(loader, 2)
    assert list(loader.batch_sampler) == list(sampler(seed=3, epoch=2))


def test_partners_are_drawn_uniformly_from_the_other_samples_of_the_class():
    counts = torch.zeros(len(TARGETS), dtype=torch.int64)
    s = sampler()
    for epoch in range(1200):
        counts[s.partners(epoch)[0]] += 1  # position 0 (class 0) has 4 others: 2, 6, 9, 12
    others = [2, 6, 9, 12]
    assert counts.sum() == counts[others].sum() == 1200
    assert all(abs(int(counts[i]) - 300) < 60 for i in others)


def test_the_classes_are_read_through_the_train_subset():
    base = IndexedDataset(list(range(len(TARGETS))), TARGETS)
    subset = Subset(base, [12, 4, 7, 1, 0])
    assert split_targets(subset).tolist() == TARGETS[[12, 4, 7, 1, 0]].tolist()
    for batch in class_pair_batches(subset, 0, 0, 2):
        for sample, partner in pairs_of(batch):  # positions of the subset, partners of its own classes
            assert split_targets(subset)[sample] == split_targets(subset)[partner]
    with pytest.raises(KdlabError, match="has no `targets`"):
        split_targets(list(range(4)))


def test_under_ddp_lightning_puts_its_distributed_sampler_in_and_the_pairs_stay_whole():
    base = IndexedDataset(list(range(len(TARGETS))), TARGETS)
    # As Lightning asks the datamodule for its loader: the arguments are saved, to build it again.
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(base, batch_sampler=class_pair_batches(base, 7, 0, 3), collate_fn=collate)
    firsts, partners = [], {}
    for rank in (0, 1):
        shard = DistributedSampler(base, num_replicas=2, rank=rank, shuffle=True, seed=7)
        replaced = _update_dataloader(loader, shard)
        assert (
            isinstance(replaced.batch_sampler, ClassPairBatches) and replaced.batch_sampler.sampler is shard
        )
        for batch in replaced.batch_sampler:
            for sample, partner in pairs_of(batch):
                assert TARGETS[sample] == TARGETS[partner]
                assert partners.setdefault(sample, partner) == partner  # one draw per epoch, on every rank
                firsts.append(sample)
    assert set(firsts) == set(range(len(TARGETS)))


def test_the_datamodule_serves_pairs_once_the_scheme_asks(tmp_path, fashion_mnist):
    cfg = compose_config([*fast_overrides(tmp_path), "mode=cskd", "data.batch_size=8"])
    datamodule = instantiate(cfg.data)
    sources = CSKD.sources_for(cfg, datamodule, None)
    assert sources.modules == {} and sources.frozen is None
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input"].shape[0] == 16
    assert torch.equal(batch["target"][:8], batch["target"][8:])
    targets = datamodule.train_set.dataset.targets
    assert torch.equal(targets[batch["index"]], batch["target"])  # `index` still names the samples
    scheme = build_scheme(cfg, datamodule, {}, sources.modules)
    assert isinstance(scheme, CSKD) and scheme.temperature == 4.0


# --------------------------------------------------------------------------------------- the CLI
def test_a_cskd_run_on_fashion_mnist(tmp_path, fashion_mnist, teacher_store):
    args = [*cli_overrides(tmp_path, teacher_store=teacher_store), "mode=cskd", NO_PLOTS]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results["mode"] == "cskd" and results["knowledge"] == [] and results["teacher"] is None
    assert [row["model"] for row in results["models"]] == ["student"]
    metrics = results["metrics"]
    assert math.isfinite(metrics["train/cskd"]) and metrics["train/cskd"] >= 0
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["test/student/top1"] <= 1
