"""Early exits for a causal language model: BYOT's auxiliary exits (`mode=self`) after each shallow block.

A transformer's blocks all keep the residual stream's width, so an exit needs no bottleneck to reach
the deepest block's shape (the image exits of kdlab.models.exits do): its feature is the block's hidden
states `[B, T, C]` as they are, and its head is the one a decoder puts after its last block, a LayerNorm
and a linear map to the vocabulary, of its own (as early-exit LMs such as CALM, Schuster et al. 2022,
train per-layer heads). So BYOT's hint between an exit's feature and the deepest block's is an MSE
between hidden states, and each exit predicts the next token from its block.

Like AuxiliaryExits, this holds only the exits, never the model: the model's checkpoint is the same with
or without them, and the deployed model is the model alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.taps import stage_aliases


class LanguageModelExits(nn.Module):
    """A LayerNorm + linear head per shallow block ("stage1", ...) of a causal LM (kdlab.models.hf_lm)."""

    # Its features are a sequence of positions (kdlab.knowledge.layouts).
    sequence_features = True

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        super().__init__()
        stages = stage_aliases(model)
        if len(stages) < 2:
            raise KdlabError(
                f"Early exits go after the shallow blocks of a model, but the student has {len(stages)} "
                "block(s). Use a student of 2 blocks or more with mode=self (e.g. "
                "model@student=lm/gpt2_2x64)."
            )
        self.stage_names: list[str] = stages[:-1]
        self.deepest: str = stages[-1]
        width = int(getattr(model.model.config, "hidden_size", 0) or model.model.config.n_embd)
        param = next(model.parameters())
        self.exits = nn.ModuleDict(
            {
                name: nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab_size, bias=False))
                for name in self.stage_names
            }
        ).to(device=param.device, dtype=param.dtype)

    def forward(self, stage_features: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """{stage: (its hidden states, its next-token logits)} for each shallow block."""
        return {
            name: (stage_features[name], self.exits[name](stage_features[name])) for name in self.stage_names
        }
