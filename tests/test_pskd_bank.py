"""PS-KD's prediction bank: last-epoch rows keyed by index, the alpha ramp, targets and loss by hand."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.schemes.pskd_bank import PredictionBank


def test_buffers_start_empty_and_are_sized_by_the_split():
    bank = PredictionBank(num_samples=10, num_classes=3)
    assert bank.probs.shape == (10, 3) and bank.probs.dtype == torch.float32
    assert not bank.probs.any() and not bank.seen.any()
    assert bank.epoch_of.dtype == torch.int64 and (bank.epoch_of == -1).all()
    assert set(dict(bank.named_buffers())) == {"probs", "seen", "epoch_of"}


def test_previous_returns_exactly_the_last_epochs_rows_by_index():
    bank = PredictionBank(num_samples=10, num_classes=3)
    written = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    index = torch.tensor([3, 7])
    bank.store(index, written, epoch=0)

    # Within epoch 0 the rows exist but are this epoch's own predictions: not targets yet.
    _, mask = bank.previous(index, epoch=0)
    assert not mask.any()

    probs, mask = bank.previous(index, epoch=1)
    assert torch.equal(probs, written) and mask.all()
    # Keyed by index, not by position in the batch.
    probs, mask = bank.previous(torch.tensor([7, 5, 3]), epoch=1)
    assert torch.equal(probs[0], written[1]) and torch.equal(probs[2], written[0])
    assert mask.tolist() == [True, False, True]


def test_store_detaches_and_overwrites_with_the_newer_epoch():
    bank = PredictionBank(num_samples=4, num_classes=2)
    logits = torch.randn(2, 2, requires_grad=True)
    bank.store(torch.tensor([0, 1]), logits.softmax(1), epoch=0)
    assert not bank.probs.requires_grad

    newer = torch.tensor([[0.9, 0.1]])
    bank.store(torch.tensor([1]), newer, epoch=1)
    assert bank.epoch_of.tolist() == [0, 1, -1, -1] and bank.seen.tolist() == [True, True, False, False]
    # At epoch 1, row 1 now holds epoch 1's prediction: masked out until epoch 2.
    _, mask = bank.previous(torch.tensor([0, 1]), epoch=1)
    assert mask.tolist() == [True, False]
    probs, mask = bank.previous(torch.tensor([1]), epoch=2)
    assert torch.equal(probs, newer) and mask.all()


def test_alpha_ramps_linearly_from_zero_to_alpha_T():
    alpha = PredictionBank.alpha
    assert alpha(0, 5, 0.8) == 0.0
    assert alpha(4, 5, 0.8) == pytest.approx(0.8)
    assert [alpha(e, 5, 0.8) for e in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    # Past the end (a run extended on resume) it stays at alpha_T; before the start, 0.
    assert alpha(9, 5, 0.8) == pytest.approx(0.8) and alpha(-1, 5, 0.8) == 0.0
    # One epoch: no previous epoch exists, so nothing to mix in.
    assert alpha(0, 1, 0.8) == 0.0
    assert alpha(3, 4, 0.0) == 0.0 and alpha(3, 4, 1.0) == 1.0


def test_buffers_round_trip_through_state_dict():
    bank = PredictionBank(num_samples=5, num_classes=3)
    bank.store(torch.tensor([1, 4]), torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]), epoch=2)
    state = bank.state_dict()
    assert set(state) == {"probs", "seen", "epoch_of"}

    resumed = PredictionBank(num_samples=5, num_classes=3)
    resumed.load_state_dict(state)
    for name in ("probs", "seen", "epoch_of"):
        assert torch.equal(getattr(resumed, name), getattr(bank, name))
    probs, mask = resumed.previous(torch.tensor([4, 0]), epoch=3)
    assert torch.equal(probs[0], torch.tensor([0.6, 0.3, 0.1])) and mask.tolist() == [True, False]


@pytest.mark.parametrize(("num_samples", "num_classes"), [(0, 10), (10, 1)], ids=["no-samples", "one-class"])
def test_bad_sizes_are_explained(num_samples, num_classes):
    with pytest.raises(KdlabError, match="num_samples >= 1 and num_classes >= 2"):
        PredictionBank(num_samples, num_classes)


@pytest.mark.parametrize("alpha_T", [-0.1, 1.5])
def test_alpha_T_outside_unit_interval_names_the_config_key(alpha_T):
    with pytest.raises(KdlabError, match=r"mode\.alpha_T"):
        PredictionBank.alpha(0, 10, alpha_T)


def test_bad_max_epochs_is_explained():
    with pytest.raises(KdlabError, match="max_epochs >= 1"):
        PredictionBank.alpha(0, 0, 0.8)


@pytest.mark.parametrize("bad", [[0, 4], [-1]], ids=["too-large", "negative"])
def test_out_of_range_indices_say_how_the_bank_was_sized(bad):
    bank = PredictionBank(num_samples=4, num_classes=3)
    with pytest.raises(KdlabError, match="sized for 4 samples"):
        bank.previous(torch.tensor(bad), epoch=1)
    with pytest.raises(KdlabError, match="sized for 4 samples"):
        bank.store(torch.tensor(bad), torch.full((len(bad), 3), 1 / 3), epoch=0)


def test_mismatched_shapes_are_explained():
    bank = PredictionBank(num_samples=4, num_classes=3)
    with pytest.raises(KdlabError, match="1-D integer tensor"):
        bank.previous(torch.tensor([0.0, 1.0]), epoch=1)
    with pytest.raises(KdlabError, match="probabilities of shape"):
        bank.store(torch.tensor([0, 1]), torch.zeros(2, 5), epoch=0)
