"""PS-KD's per-sample memory of the model's own last-epoch predictions.

Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets" (ICCV),
Sec. 3: the model at epoch t is trained against the soft target

    target_t(x) = (1 - alpha_t) * y + alpha_t * P_{t-1}(x)

where y is the one-hot label and P_{t-1}(x) the softmax prediction that the same model made for
the same sample x in the previous epoch, with the loss H(target_t, P_t(x)) (cross-entropy against
a probability vector) and the linear schedule alpha_t = alpha_T * t / T.

`PredictionBank` holds P_{t-1} for every training sample, keyed by `batch["index"]` like CRD's
memory bank (kdlab.knowledge.contrastive), as buffers so that a resumed run keeps the targets the
interrupted run would have used. A training step reads (`previous`) before it
writes (`store`), so a step's own predictions never become targets within the same epoch.

Under DDP `store` writes every process's rows (`kdlab.distributed.gather_rows`), so each process's
bank holds the predictions for the whole epoch, not only its sampler's share, and the banks of all
processes stay identical, as the single bank of a one-process run.

Cost: num_samples x num_classes float32 saved in the checkpoint: 2.4 MB for Fashion-MNIST
(60,000 x 10), 20 MB for CIFAR-100 (50,000 x 100), but about 5 GB for ImageNet-1k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.distributed import gather_rows
from kdlab.errors import KdlabError


class PredictionBank(nn.Module):
    """The last stored softmax prediction per training sample, and the epoch it was made in.

    Buffers (all saved in `state_dict`):
        probs: (num_samples, num_classes) float32, the stored probabilities (zeros until written).
        seen: (num_samples,) bool, whether the row was ever written.
        epoch_of: (num_samples,) int64, the epoch the row was written in (-1 = never).

    A row counts as a target only when it was written in an *earlier* epoch than the one asking,
    so calling `store` for the current batch cannot leak into this epoch's targets even if a
    sample is drawn twice. A row written two or more epochs ago (a sample the sampler skipped
    last epoch, e.g. with `limit_train_batches`) still counts: it is the model's latest
    prediction for that sample, which is what the paper's P_{t-1} stands for.

    Under DDP each process holds its own bank; `store` gathers every process's rows before the
    write, so the banks stay identical and every row is written each epoch.
    """

    probs: Tensor
    seen: Tensor
    epoch_of: Tensor

    def __init__(self, num_samples: int, num_classes: int):
        super().__init__()
        if int(num_samples) < 1 or int(num_classes) < 2:
            raise KdlabError(
                "PS-KD keeps one stored prediction per training sample over the classes, so it needs "
                f"num_samples >= 1 and num_classes >= 2; got num_samples={num_samples}, "
                f"num_classes={num_classes}. Build the scheme through kdlab.build, or pass "
                "num_samples=len(training split) and num_classes=data.num_classes."
            )
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.register_buffer("probs", torch.zeros(self.num_samples, self.num_classes))
        self.register_buffer("seen", torch.zeros(self.num_samples, dtype=torch.bool))
        self.register_buffer("epoch_of", torch.full((self.num_samples,), -1, dtype=torch.int64))

    def check_index(self, index: Tensor) -> None:
        """Raise a KdlabError unless `index` is a 1-D integer tensor of rows this bank has."""
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise KdlabError(
                f"PS-KD looks predictions up by sample index, but got an index tensor of shape "
                f"{tuple(index.shape)} and dtype {index.dtype}. The datamodule must put a 1-D integer "
                "tensor of dataset indices in batch['index']."
            )
        # One host sync per call: without it an out-of-range index is a CUDA assert, not a message.
        if index.numel() and bool(((index < 0) | (index >= self.num_samples)).any()):
            raise KdlabError(
                f"PS-KD's prediction bank was sized for {self.num_samples} samples (indices 0.."
                f"{self.num_samples - 1}), but batch['index'] holds indices from {int(index.min())} to "
                f"{int(index.max())}. Build the bank with num_samples=len(training split) for the split "
                "being trained on, and make sure batch['index'] holds that split's dataset indices."
            )

    def previous(self, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """The stored rows for `index`, and a mask of those written in an epoch before `epoch`.

        Rows never written, or written in `epoch` itself, have mask False; their probabilities
        (zeros, or this epoch's) must not be used as targets.
        """
        self.check_index(index)
        mask = self.seen[index] & (self.epoch_of[index] < int(epoch))
        return self.probs[index], mask

    @torch.no_grad()
    def store(self, index: Tensor, probs: Tensor, epoch: int) -> None:
        """Write `probs` (softmax outputs, one row per index) for `index`, tagged with `epoch`.

        Call it after `previous` in the same step. Detached and cast to float32:
        the stored targets are constants of later epochs, not part of this step's graph. With a
        repeated index in one call, which of its rows is kept is unspecified (as for any indexed
        write); a sampler that draws each sample once per epoch never repeats one.

        Under DDP every process must call it in the same step (it all-gathers the rows of all
        processes and writes them all). An index repeated across processes (DistributedSampler
        pads the last shares with repeated samples) keeps the lowest rank's row.
        """
        self.check_index(index)
        if probs.shape != (index.shape[0], self.num_classes):
            raise KdlabError(
                f"PS-KD stores one probability vector of {self.num_classes} classes per index, but got "
                f"probabilities of shape {tuple(probs.shape)} for {index.shape[0]} indices. Pass "
                "logits.detach().softmax(dim=1) of the batch whose batch['index'] is given."
            )
        index, probs = gather_rows(index, probs.detach())
        self.probs[index] = probs.to(self.probs.dtype)
        self.seen[index] = True
        self.epoch_of[index] = int(epoch)

    @staticmethod
    def alpha(epoch: int, max_epochs: int, alpha_T: float) -> float:
        """The paper's alpha_t = alpha_T * t / T with 0-based epochs: alpha_T * epoch / (max_epochs - 1).

        The paper's t / T runs from 0 to 1 over training; here epoch 0 (when no earlier prediction
        exists, so the targets are one-hot anyway) gives 0 and the last epoch, max_epochs - 1,
        gives alpha_T, linear between. The result is clamped to [0, alpha_T], so epochs past the
        end (a run extended on resume) keep alpha_T. With max_epochs == 1 there is no previous
        epoch to learn from, and alpha is 0.

        The authors' code uses alpha_T * (epoch + 1) / max_epochs instead, which also ends at
        alpha_T but is alpha_T / max_epochs higher at epoch 0 (unused there) and slightly higher
        in between; the difference is below alpha_T / max_epochs at every epoch.
        """
        if not 0.0 <= float(alpha_T) <= 1.0:
            raise KdlabError(
                f"PS-KD's final mixing weight alpha_T must lie in [0, 1] (0 = plain cross-entropy, "
                f"1 = the last epoch trains only on the model's own predictions); got mode.alpha_T="
                f"{alpha_T}. The paper uses 0.8; set mode.alpha_T=0.8."
            )
        if int(max_epochs) < 1:
            raise KdlabError(
                f"PS-KD ramps its mixing weight over the run's epochs, so it needs max_epochs >= 1; got "
                f"{max_epochs}. Set trainer.max_epochs to a positive number of epochs."
            )
        if max_epochs == 1:
            return 0.0
        ramp = float(alpha_T) * int(epoch) / (int(max_epochs) - 1)
        return min(max(ramp, 0.0), float(alpha_T))
