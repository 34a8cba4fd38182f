"""Text the language models write, shown after the test: a researcher reads samples beside the perplexities.

`SamplesCallback` (conf/callbacks, on with task=lm) takes the first tokens of a few test windows as
prompts, lets every reported language model (teacher, student, peers) continue each one, and writes the
prompts and continuations to `samples.md` in the run directory, to the run's log, and to the loggers that
show tables (W&B's `samples` table). The sampling is seeded on its own, so it leaves the run's random
state as it was and two runs of the same models write the same samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class SamplesCallback(L.Callback):
    """After the test, `num_prompts` continuations of `new_tokens` tokens per language model."""

    def __init__(
        self,
        output_file: str,
        num_prompts: int = 3,
        prompt_tokens: int = 32,
        new_tokens: int = 64,
        temperature: float = 0.8,
        seed: int = 0,
    ):
        self.output_file = Path(output_file)
        self.num_prompts, self.prompt_tokens, self.new_tokens = num_prompts, prompt_tokens, new_tokens
        self.temperature, self.seed = temperature, seed

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None)
        models = {name: m for name, m in pl_module.models().items() if hasattr(m, "sample")}
        if tokenizer is None or not models or not trainer.is_global_zero:
            return
        windows = datamodule.splits["test"].inputs[: self.num_prompts]
        prompts = windows[:, : self.prompt_tokens]
        rows = []
        for name, model in models.items():
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                new = min(self.new_tokens, model.context - prompts.shape[1])
                out = model.sample(prompts.to(device), new, temperature=self.temperature).cpu()
            for i, sequence in enumerate(out):
                prompt, continuation = prompts[i].tolist(), sequence[prompts.shape[1] :].tolist()
                rows.append([name, i, tokenizer.decode(prompt), tokenizer.decode(continuation)])
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        self.output_file.write_text(_markdown(rows, self.temperature))
        log.info("Samples at temperature %s:\n%s", self.temperature, _markdown(rows, self.temperature))
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(
                    key="samples", columns=["model", "prompt #", "prompt", "continuation"], data=rows
                )


def _markdown(rows: list[list], temperature: float) -> str:
    lines = [f"# Samples (temperature {temperature})", ""]
    for name, index, prompt, continuation in rows:
        lines += [f"## {name}, prompt {index}", "", "```", prompt, "```", "", "```", continuation, "```", ""]
    return "\n".join(lines)
