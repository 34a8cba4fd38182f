"""Class-wise Self-Knowledge Distillation (`mode=cskd`): a sample learns from another sample of its class.

Yun et al. 2020, "Regularizing Class-wise Predictions via Self-knowledge Distillation" (CVPR). Every
training batch is made of same-class pairs (kdlab.data.class_pairs); the model's own, detached
prediction for the partner is the soft target of the sample. No teacher, no extra model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from kdlab.data.class_pairs import class_pair_batches
from kdlab.errors import KdlabError
from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.student import StudentScheme


def mode_number(
    value: object,
    name: str,
    example: object,
    minimum: float = 0.0,
    strict: bool = True,
    maximum: float | None = None,
    why: str = "",
) -> float:
    """`value` as a float if it is a finite number in range, else a KdlabError naming `mode.<name>`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum is not None:
            bound += f" and <= {maximum:g}"
        reason = f" ({why})" if why else ""
        raise KdlabError(
            f"mode.{name}={value!r}: {name} must be a finite number {bound}{reason}. "
            f"Set it to such a number, e.g. mode.{name}={example}."
        )
    return float(value)


def refuse_knowledge(names: Iterable[str], method: str, own: str) -> None:
    """A KdlabError if knowledge terms were configured for a scheme whose loss is its own."""
    names = list(names)
    if names:
        raise KdlabError(
            f"mode={method} computes its own loss ({own}), so knowledge={','.join(names)} has nothing "
            f"to compare with and would be ignored. Leave knowledge= out with mode={method} (its "
            "hyper-parameters are mode.* keys), or pick a scheme that uses knowledge terms (e.g. "
            "mode=offline, pskd or born_again)."
        )


def class_wise_kd(logits: Tensor, partner_logits: Tensor, temperature: float) -> Tensor:
    """CS-KD's regulariser (Yun et al. 2020, L_cls times T^2): T^2 * KL(softmax(z(x')/T) || softmax(z(x)/T)).

    `partner_logits` (the same-class samples x') are detached: the paper's fixed copy of the parameters.
    Summed over classes and averaged over the samples; T^2 keeps the gradient's scale independent of T.
    """
    log_p = F.log_softmax(logits / temperature, dim=1)
    target = F.softmax(partner_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean") * temperature**2


class CSKD(StudentScheme):
    """Class-wise Self-Knowledge Distillation (Yun et al. 2020): the paper's L_cls and L_CS-KD.

    Each batch is [x_1..x_B, x'_1..x'_B] with x'_i another sample of x_i's class (kdlab.data.class_pairs,
    which `sources_for` asks the datamodule for). The loss is L_CS-KD,

        L = CE(z(x), y) + lambda * T^2 * KL(softmax(z(x')/T) || softmax(z(x)/T)),

    with z(x') computed under no_grad (the paper's fixed copy of the parameters) and the cross-entropy
    on the first half only, as in the authors' train.py. Both halves run through the model in training
    mode, one forward each (so BatchNorm normalises each half by its own statistics and updates its
    running statistics with both), as there. Defaults are the authors' CIFAR-100 recipe: T = 4,
    lambda = 1 (train.py's --temp and --lamda; their README uses lambda = 3 on fine-grained data).

    Differences from the authors' code (github:alinlab/cs-kd, train.py and datasets.py):
    - A partner is another sample of the class; their PairBatchSampler may pick the sample itself
      (1 in |class| of the time), which the paper's "another sample" rules out.
    - The batches are a function of (seed, epoch) (resumable), where theirs follow Python's global RNG.

    `data.batch_size` is the number of samples in each half, as the authors' --batch-size: a step runs
    the model on twice as many. Knowledge terms are refused: the loss is the scheme's own.

    Args:
        temperature: T, the softmax temperature of both predictions.
        weight: lambda, the weight of the class-wise term (the cross-entropy has weight 1).
    """

    name = "cskd"
    tasks = ("image",)  # its bank and pairs are per image

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """Nothing to obtain but the batches: same-class pairs, asked of the datamodule."""
        refuse_knowledge(
            cfg.get("knowledge") or {}, "cskd", "cross-entropy plus the KL to a same-class sample"
        )
        datamodule.use_batch_sampler(class_pair_batches)
        return Sources()

    def __init__(self, *args, temperature: float = 4.0, weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_knowledge(self.templates, "cskd", "cross-entropy plus the KL to a same-class sample")
        self.temperature = mode_number(temperature, "temperature", 4, why="it divides the logits")
        self.weight = mode_number(weight, "weight", 1, strict=False)
        self._pairs_checked = False
        self.prepare()

    def halves(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The batch's samples and their partners: its first and second halves."""
        n, odd = divmod(len(batch["target"]), 2)
        if odd or n == 0:
            raise KdlabError(
                f"mode=cskd got a training batch of {len(batch['target'])} samples, which is not pairs of a "
                "sample and its same-class partner. Its batches come from kdlab.data.class_pairs: build the "
                "run with kdlab.run (CSKD.sources_for asks the datamodule for them), or call "
                "datamodule.use_batch_sampler(kdlab.data.class_pairs.class_pair_batches) first."
            )
        first = {key: value[:n] for key, value in batch.items()}
        second = {key: value[n:] for key, value in batch.items()}
        if not self._pairs_checked:  # once per fit: reading the labels waits for the device
            if not torch.equal(first["target"], second["target"]):
                raise KdlabError(
                    "mode=cskd needs every training batch to pair each sample with one of its class, but "
                    "the batch's halves have different labels: the loader is not the class-pair one. Build "
                    "the run with kdlab.run, or call datamodule.use_batch_sampler(kdlab.data.class_pairs."
                    "class_pair_batches) before training."
                )
            self._pairs_checked = True
        return first, second

    def on_fit_start(self) -> None:
        self._pairs_checked = False

    def loss_terms(self, logits: Tensor, partner_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The unweighted terms: cross-entropy on the samples, and the class-wise KL."""
        return {
            "task": F.cross_entropy(logits, target),
            "cskd": class_wise_kd(logits, partner_logits, self.temperature),
        }

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        first, second = self.halves(batch)
        logits = self.student_tap(first["input"]).logits
        with torch.no_grad():  # the partner's prediction is a target: no gradient through it
            partner_logits = self.student(second["input"])
        terms = self.loss_terms(logits, partner_logits, first["target"])
        loss = self.task_weight * terms["task"] + self.weight * terms["cskd"]
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, self.task_weight * terms["task"])
