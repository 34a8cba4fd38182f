"""What the models predict, and how a prediction is scored: image classification or language modelling.

A scheme is written once for both tasks. It asks its `Task` for the few things that differ:
- `example_input`: a dry-run batch (float images, or token ids);
- `predictions`: the logits and labels of the positions that count, as `[N, C]` and `[N]`. For an
  image that is the batch itself. For a language model it is every counted token of every sequence
  (the next-token logits `[B, T, V]` and labels `[B, T]`, -100 where a position does not count: padding,
  a prompt), so the cross-entropy, every response loss (KD, DKD, the sequence divergences...) and the
  metrics read per-token distributions with the mask already applied;
- `metrics`: top-1 (and top-5) as fractions of samples, or, per token, top-1 (next-token accuracy)
  and perplexity, exp of the mean cross-entropy per counted token;
- `check_logits`: that a model's output fits the data, with the error a user can act on.

The data says which task it is (`datamodule.task`, else image classification: `task_of`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from kdlab.data.text import IGNORE_INDEX
from kdlab.errors import KdlabError


def fraction_correct(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    """The fraction of samples whose label is among the top-k predictions.

    `average="micro"`: torchmetrics' MulticlassAccuracy averages per class by default ("macro"),
    which is not the fraction of samples the results table promises.
    """
    return MulticlassAccuracy(num_classes, top_k=top_k, average="micro")


class TokenPerplexity(Perplexity):
    """torchmetrics' perplexity, exp(mean cross-entropy per counted token), updated with the flat
    `[N, V]` logits and `[N]` labels of `Task.predictions`."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds.unsqueeze(0), target.unsqueeze(0))


class Task:
    """Base of the tasks; see the module docstring."""

    #: the task's name in messages and configs
    name = "task"

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def example_input(self, batch_size: int = 2) -> Tensor:
        raise NotImplementedError

    def predictions(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The logits `[N, C]` and labels `[N]` of the positions that count."""
        return logits, target

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The task loss: cross-entropy over the positions that count (given the flat predictions)."""
        return F.cross_entropy(logits, target)

    def metrics(self, prefix: str) -> MetricCollection:
        raise NotImplementedError

    def check_logits(self, logits: Tensor, role: str) -> None:
        raise NotImplementedError


class ImageClassification(Task):
    """One label per image, `num_classes` of them; inputs `[B, *input_shape]`."""

    name = "image"

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__(num_classes)
        self.input_shape = tuple(input_shape)

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, *self.input_shape)

    def metrics(self, prefix: str) -> MetricCollection:
        """Top-1, plus top-5 where it means something (20 classes or more), as fractions of samples."""
        metrics = {"top1": fraction_correct(self.num_classes)}
        if self.num_classes >= 20:
            metrics["top5"] = fraction_correct(self.num_classes, top_k=5)
        return MetricCollection(metrics, prefix=prefix)

    def check_logits(self, logits: Tensor, role: str) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise KdlabError(
                f"The {role} outputs logits of shape {tuple(logits.shape)}, but the data has "
                f"{self.num_classes} classes, so its predictions cannot be compared with the labels or with "
                f"the other model. Build the {role} with num_classes={self.num_classes} (e.g. "
                f"{role}.num_classes=${{data.num_classes}}), or load a checkpoint trained on this data."
            )


class LanguageModeling(Task):
    """Next-token prediction over a vocabulary of `vocab_size` tokens, on sequences of `seq_len`."""

    name = "lm"

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__(vocab_size)
        self.seq_len = int(seq_len)

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.seq_len, dtype=torch.int64)

    def predictions(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if logits.ndim == 2:  # already flat
            return logits, target
        counted = target != IGNORE_INDEX
        if bool(counted.all()):  # packed windows: a view, no copy of the logits
            return logits.flatten(0, 1), target.flatten()
        return logits[counted], target[counted]

    def metrics(self, prefix: str) -> MetricCollection:
        """Next-token top-1 (the fraction of counted tokens predicted exactly) and perplexity."""
        metrics = {"top1": fraction_correct(self.num_classes), "perplexity": TokenPerplexity()}
        return MetricCollection(metrics, prefix=prefix)

    def check_logits(self, logits: Tensor, role: str) -> None:
        if logits.ndim != 3 or logits.shape[-1] != self.num_classes:
            raise KdlabError(
                f"The {role} outputs logits of shape {tuple(logits.shape)}, but a language model of this "
                f"data gives [batch, tokens, vocabulary] over the tokenizer's {self.num_classes} tokens: "
                "teacher, student and data must share one tokenizer (cross-tokenizer distillation is not "
                f"supported yet). Build the {role} as a causal LM for the data's tokenizer (e.g. "
                f"model@{role}=lm/gpt2_2x64), or use a checkpoint trained with it."
            )


def task_of(datamodule) -> Task:
    """The data's task (`datamodule.task`), else image classification of its classes and input shape."""
    task = getattr(datamodule, "task", None)
    if isinstance(task, Task):
        return task
    return ImageClassification(datamodule.num_classes, tuple(datamodule.input_shape))
