"""On-policy distillation for language models (`mode=on_policy`): the student also learns on its own samples.

Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist and Bachem 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD, ICLR), Algorithm 1. A frozen teacher, as in
`mode=offline`; at each training step, with probability λ (`student_data_fraction`, the paper's λ) the
batch's windows are replaced by the student's own continuations: the first `prompt_tokens` tokens of
each window are kept as the prompt, and the student samples the rest at `temperature` (no gradient
flows through the sampling, as in the paper: the samples are data). The knowledge terms then compare
the teacher and the student on those sequences; the response losses read the completion positions
only: the prompt's positions do not count (their labels are -100), nor does the last one, whose next
token is not sampled (a model's context may be just the window's length). λ = 0 is supervised KD on
the data, λ = 1 is fully on-policy; the paper's best mix uses λ = 0.5 with JSD(0.9) or reverse KL
(`knowledge=gkd knowledge.gkd.beta=0.9`).

On a sampled batch the task loss (cross-entropy) is 0: the labels are the student's own samples, and
the cross-entropy towards them would only reinforce what it already does.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor

from kdlab.data.text import IGNORE_INDEX
from kdlab.errors import KdlabError
from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.offline import GENERATED, Offline
from kdlab.taps import Outputs


def check_generation(prompt_tokens: int, temperature: float, seq_len: int) -> None:
    """The prompt length and sampling temperature of a scheme that continues each window's first tokens."""
    if (
        isinstance(prompt_tokens, bool)
        or not isinstance(prompt_tokens, int)
        or not 1 <= prompt_tokens < seq_len
    ):
        raise KdlabError(
            f"mode.prompt_tokens={prompt_tokens!r}: the prompt is the first tokens of each window of "
            f"data.seq_len={seq_len}, so it must be a whole number in [1, {seq_len - 1}], e.g. "
            f"mode.prompt_tokens={min(16, seq_len // 2)}."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise KdlabError(
            f"mode.temperature={temperature!r} must be > 0 (the sampling temperature, e.g. 1.0)."
        )


def check_options(student_data_fraction: float, prompt_tokens: int, temperature: float, seq_len: int) -> None:
    """mode=on_policy's options (KdlabError naming the key)."""
    if isinstance(student_data_fraction, bool) or not 0 <= student_data_fraction <= 1:
        raise KdlabError(
            f"mode.student_data_fraction={student_data_fraction} is a probability (GKD's lambda): set it "
            "in [0, 1], e.g. 0.5 (half the batches are the student's samples)."
        )
    check_generation(prompt_tokens, temperature, seq_len)


def continuation_batch(sequences: Tensor, prompt_tokens: int) -> dict[str, Tensor]:
    """A window of generated text `[B, T]` as a batch's `input` and `target` (the next token at each
    position), where only the continuation counts: the labels that are prompt tokens are -100, and so is
    the last position's, whose next token was not generated."""
    target = torch.full_like(sequences, IGNORE_INDEX)
    target[:, prompt_tokens - 1 : -1] = sequences[:, prompt_tokens:]
    return {"input": sequences, "target": target, GENERATED: torch.ones((), dtype=torch.bool)}


class OnPolicy(Offline):
    """GKD's mixture of data and student samples (see the module docstring)."""

    name = "on_policy"
    tasks = ("lm",)

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """The frozen teacher, as mode=offline's; the options are checked first, before it is trained."""
        mode = cfg.mode
        check_options(mode.student_data_fraction, mode.prompt_tokens, mode.temperature, datamodule.seq_len)
        return super().sources_for(cfg, datamodule, store)

    def __init__(
        self,
        *args,
        student_data_fraction: float = 0.5,
        prompt_tokens: int = 16,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        check_options(student_data_fraction, prompt_tokens, temperature, self.task.seq_len)
        self.student_data_fraction = float(student_data_fraction)
        self.prompt_tokens = prompt_tokens
        self.temperature = float(temperature)

    @torch.no_grad()
    def student_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The batch with its windows replaced by the student's continuations of their first tokens."""
        prompt = batch["input"][:, : self.prompt_tokens]
        sequences = self.student.sample(
            prompt, self.task.seq_len - self.prompt_tokens, temperature=self.temperature
        )
        return {**batch, **continuation_batch(sequences, self.prompt_tokens)}

    def loss_terms(self, student: Outputs, source: Outputs | None, batch: Mapping[str, Tensor]) -> dict:
        terms = super().loss_terms(student, source, batch)
        if GENERATED in batch:  # the student's own samples
            terms["task"] = terms["task"].detach() * 0  # see the module docstring
        return terms

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        # Drawn from the run's RNG, which kdlab seeds per epoch: the same batches are sampled on a rerun.
        if self.student_data_fraction > 0 and float(torch.rand(())) < self.student_data_fraction:
            batch = self.student_batch(batch)
        return super().training_step(batch, batch_idx)
