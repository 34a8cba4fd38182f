"""Contrastive knowledge: CRD, whose negatives come from a memory bank keyed by sample index."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.distributed import gather_rows, mean_across_processes, world_size
from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext
from kdlab.taps import Outputs

EPS = 1e-7


class CRD(Knowledge):
    """Tian et al. 2020, "Contrastive Representation Distillation", Eq. 10-19.

    Both models' embeddings go through learned linear heads to `feat_dim` and are L2-normalised.
    A memory bank per model holds one embedding per training sample, keyed by `batch["index"]`.
    For each sample, its own bank entry is the positive and `num_negatives` entries drawn
    uniformly from the bank are the negatives. Scores are exp(v . m / tau) divided by a
    normaliser Z that is estimated once, from the first batch, as mean score * N (the NCE
    approximation of the partition function, as in the reference code). The loss is NCE
    (Eq. 18) with the noise distribution Pn = 1/N, taken in both directions: teacher embedding
    against the student bank, and student embedding against the teacher bank. After each step
    the positives' bank entries move toward the new embeddings with `momentum` and are
    re-normalised.

    Defaults are the CRD benchmark's: feat_dim 128, 16384 negatives, tau 0.07, momentum 0.5,
    weight 0.8, cross-entropy weight 1.

    Difference from the reference CIFAR code: that loader draws the negatives only from other
    classes. Here they are drawn uniformly, as in the paper's NCE formulation.

    Under DDP the banks and Z are the same in every process, as in the single-process reference:
    each step's bank update is made with every process's indices and embeddings
    (`kdlab.distributed.gather_rows`), so each bank sees the whole epoch, and Z is the mean of
    the processes' estimates, i.e. the estimate over the union of their first batches (which
    DistributedSampler makes equal in size).

    Cost: two banks of N x feat_dim floats, about 61 MB for Fashion-MNIST's 60,000 training
    indices, saved in the checkpoint. Per bank and step, one B x N x feat_dim product with the whole
    bank while N is at most FULL_PRODUCT_RATIO x (K+1) (Fashion-MNIST, CIFAR), else the reference
    code's (B, K+1, feat_dim) gather (see `dots`); under DDP also an all-gather of the step's indices
    and 2 x feat_dim floats per sample.
    """

    key = "crd"

    def __init__(
        self,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        weight: float = 0.8,
        task_weight: float = 1.0,
        student_layers: tuple[str, ...] | list[str] = ("embedding",),
        teacher_layers: tuple[str, ...] | list[str] = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise KdlabError(
                "CRD contrasts one embedding per model, but got student_layers="
                f"{list(self.student_layers)} and teacher_layers={list(self.teacher_layers)}. "
                f"Set knowledge.{self.name}.student_layers=[embedding] and "
                f"knowledge.{self.name}.teacher_layers=[embedding]."
            )
        if not 0 <= momentum < 1 or temperature <= 0 or num_negatives < 1:
            raise KdlabError(
                f"CRD needs 0 <= momentum < 1, temperature > 0 and num_negatives >= 1; got momentum="
                f"{momentum}, temperature={temperature}, num_negatives={num_negatives}. "
                f"Fix knowledge.{self.name}.*."
            )
        self.feat_dim, self.num_negatives = int(feat_dim), int(num_negatives)
        self.temperature, self.momentum = float(temperature), float(momentum)
        # Per direction: whether this process has averaged its Z estimate with the other processes.
        self._z_shared = [False, False]

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        if context is None or not context.num_samples:
            raise KdlabError(
                f"knowledge.{self.name} (CRD) keeps one memory-bank entry per training sample, so it "
                "needs the size of the training split, but build() got none. Build the scheme through "
                "kdlab.build, or pass context=LossContext(num_samples=len(training split))."
            )
        self.num_samples = int(context.num_samples)
        s_dim = student.feats[self.student_layers[0]].flatten(1).shape[1]
        t_dim = source.feats[self.teacher_layers[0]].flatten(1).shape[1]
        self.embed_student = nn.Linear(s_dim, self.feat_dim)
        self.embed_teacher = nn.Linear(t_dim, self.feat_dim)
        # Uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3), as in the reference code.
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(self.num_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z per direction; -1 = not yet set

    def embed(self, outputs: Outputs, layer: str, head: nn.Linear) -> Tensor:
        return F.normalize(head(outputs.feats[layer].flatten(1)), dim=1)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        index = batch["index"]
        v_s = self.embed(student, self.student_layers[0], self.embed_student)
        v_t = self.embed(source, self.teacher_layers[0], self.embed_teacher)
        k = min(self.num_negatives, self.num_samples - 1)
        contrast = torch.randint(0, self.num_samples, (index.shape[0], k + 1), device=index.device)
        contrast[:, 0] = index  # column 0 is the positive
        scores_t = self.scores(self.memory_student, contrast, v_t, 0)  # teacher anchor, student bank
        scores_s = self.scores(self.memory_teacher, contrast, v_s, 1)  # student anchor, teacher bank
        self.update_memory(index, v_s.detach(), v_t.detach())
        return nce_loss(scores_t, self.num_samples) + nce_loss(scores_s, self.num_samples)

    def dots(self, bank: Tensor, contrast: Tensor, anchor: Tensor) -> Tensor:
        """m . v for each sample's (K+1) drawn bank rows m: a (B, K+1) matrix.

        Gathering the rows first, as the reference code does, copies B x (K+1) x feat_dim floats (1 GB
        per direction for a batch of 128 with 16384 negatives), which dominates a step. While the bank
        is at most FULL_PRODUCT_RATIO times the draw, the product with the whole bank (B x N dots, one
        matmul) is cheaper, and the drawn entries are then picked from it; the values are the same.
        """
        if bank.shape[0] <= FULL_PRODUCT_RATIO * contrast.shape[1]:
            # A copy: backward needs the bank as it is now, and update_memory writes it in place.
            return (anchor @ bank.clone().T).gather(1, contrast)
        return torch.bmm(bank[contrast], anchor.unsqueeze(2)).squeeze(2)

    def scores(self, bank: Tensor, contrast: Tensor, anchor: Tensor, direction: int) -> Tensor:
        """exp(m . v / tau) / Z for the (B, K+1) positive-and-negative bank rows."""
        scores = torch.exp(self.dots(bank, contrast, anchor) / self.temperature)
        # Set Z on the first call only; torch.where avoids a host sync on every step.
        estimate = scores.detach().mean() * self.num_samples
        if not self._z_shared[direction] and world_size() > 1:
            # Each process's first call averages its estimate with the others', so all processes
            # set the same Z. Every process makes this collective call once, Z set or not (a
            # resumed run's is, and keeps it), so none waits on a call another one skips.
            estimate = mean_across_processes(estimate.float())
            self._z_shared[direction] = True
        z = self.normalizers[direction]
        z = torch.where(z < 0, estimate, z)
        self.normalizers[direction] = z
        return scores / z  # the local z: the buffer is written in place, which autograd must not see

    @torch.no_grad()
    def update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        # Under DDP, every process's rows: the banks stay identical and see every sample of the epoch.
        index, v_s, v_t = gather_rows(index, v_s, v_t)
        for bank, new in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            bank[index] = F.normalize(bank[index] * self.momentum + new * (1 - self.momentum), dim=1)


# The whole-bank product (N x feat_dim x B multiply-adds) replaces the gather (B x (K+1) x feat_dim
# random reads) up to this ratio of N to K+1: Fashion-MNIST and CIFAR (3-4x) take the product,
# ImageNet (1.28M rows, about 78x) keeps the gather.
FULL_PRODUCT_RATIO = 16


def nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    """CRD Eq. 18: -[log h(positive) + sum over negatives of log(1 - h(negative))], batch mean.

    With h(x) = P(x) / (P(x) + K * Pn) and the uniform noise distribution Pn = 1 / N.
    """
    k = scores.shape[1] - 1
    noise = k / num_samples
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_negatives = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_positive.sum() + log_negatives.sum()) / scores.shape[0]
