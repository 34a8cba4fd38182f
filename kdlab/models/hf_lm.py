"""Causal language models from Hugging Face `transformers`, as kdlab models.

Two ways to get one (`create_causal_lm`):
- **built from a config**, randomly initialised: `family` is a `transformers` model type (`gpt2`,
  `llama`, ...) and `config` its sizes (e.g. `n_layer: 2, n_embd: 64` for GPT-2). The vocabulary is the
  data's tokenizer's and the context the data's sequence length, unless the config says otherwise. This
  is what the default job and the tests use: nothing to download;
- **by name or local path** (`pretrained: <hub id or directory>`): the weights and config a user has.
  A run reads local files only; `download: true` lets `transformers` fetch a hub id, and where that
  fails (no network) the error says to download it elsewhere and point at the directory.

The module returns the logits `[B, T, V]` for input ids `[B, T]` (a causal model needs no attention mask
on packed windows). Its tap points are the decoder's blocks, `stage1..N` (hidden states `[B, T, C]`),
`embedding`, the final norm's output (what the LM head reads), and `stage<i>_attention_input`, what
block i's self-attention reads (its first norm's output), from which `query_key_value` computes the
block's queries, keys and values (MiniLM's relations: kdlab.knowledge.minilm).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.models.checkpoint import load_weights

# Where each family's decoder keeps its blocks and its final norm, below the decoder (get_decoder()).
_BLOCKS = ("h", "layers", "blocks")
_FINAL_NORM = ("ln_f", "norm", "final_layernorm")
# Within a block: the norm before self-attention, and the attention module (GPT-2, Llama/Mistral/Qwen).
_ATTENTION_NORM = ("ln_1", "input_layernorm")
_ATTENTION = ("attn", "self_attn")


class CausalLM(nn.Module):
    """A `transformers` causal LM whose forward returns the logits `[B, T, V]`."""

    # Its hidden states are a sequence of positions, not a grid of patches (kdlab.knowledge.layouts).
    sequence_features = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.context = _context_length(model.config)
        self.vocab_size = int(model.config.vocab_size)
        decoder = model.get_decoder()
        blocks = next(
            (name for name in _BLOCKS if isinstance(getattr(decoder, name, None), nn.ModuleList)), None
        )
        # The decoder's blocks, in order (none: a model kdlab cannot tap inside).
        self.blocks = list(getattr(decoder, blocks)) if blocks else []
        self.tap_points = _tap_points(self)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.shape[-1] > self.context:
            raise KdlabError(
                f"A sequence of {input_ids.shape[-1]} tokens is longer than the model's context of "
                f"{self.context}. Set data.seq_len={self.context} or less, or build the model with a longer "
                "context (its config's max_position_embeddings / n_positions)."
            )
        return self.model(input_ids=input_ids).logits

    def query_key_value(self, stage: str, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block `stage`'s queries, keys and values `[B, T, width]` (heads concatenated, before any rotary
        embedding) for `hidden`, what its self-attention reads (the tap point `<stage>_attention_input`)."""
        attention = _child(self.blocks[int(stage.removeprefix("stage")) - 1], _ATTENTION)
        if hasattr(attention, "c_attn"):  # GPT-2: one fused projection
            return tuple(attention.c_attn(hidden).split(attention.embed_dim, dim=-1))
        if all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj")):
            return attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)
        raise KdlabError(
            f"The {type(attention).__name__} attention of {type(self.model).__name__} has neither a fused "
            "c_attn (GPT-2) nor q_proj/k_proj/v_proj (Llama and most others), so its queries, keys and "
            "values are not known to kdlab: use a GPT-2 or Llama-style model with knowledge=minilm."
        )

    @torch.no_grad()
    def sample(
        self, prompt: Tensor, new_tokens: int, temperature: float = 1.0, greedy: bool = False
    ) -> Tensor:
        """`prompt` `[B, P]` continued by exactly `new_tokens` tokens: `[B, P + new_tokens]`.

        Sampled from softmax(z / temperature) over the whole vocabulary (no top-k or top-p filter), or
        the most likely token with `greedy`; an end-of-document token does not stop a sequence early, so
        every continuation has the same length. In eval mode (no dropout); the mode is restored after.
        """
        if prompt.shape[-1] + new_tokens > self.context:
            raise KdlabError(
                f"A prompt of {prompt.shape[-1]} tokens and {new_tokens} new ones exceed the model's context "
                f"of {self.context}: use a shorter prompt or fewer new tokens."
            )
        was_training = self.training
        self.eval()
        try:
            # A plain loop over the model's key/value cache rather than `generate`, whose defaults (a top-k
            # filter in some versions, min_new_tokens masking the end-of-document token) would change the
            # distribution sampled from.
            # transformers 5 names the key/value cache `cache`; earlier versions `past_key_values`.
            cache = (
                "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            )
            out = self.model(input_ids=prompt, use_cache=True)
            tokens = [prompt]
            for step in range(new_tokens):
                logits = out.logits[:, -1].float()
                if greedy:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
                tokens.append(token)
                if step + 1 < new_tokens:
                    out = self.model(input_ids=token, use_cache=True, **{cache: out[cache]})
            return torch.cat(tokens, dim=1)
        finally:
            self.train(was_training)


def create_causal_lm(
    vocab_size: int,
    seq_len: int,
    family: str | None = None,
    config: dict[str, Any] | None = None,
    pretrained: str | None = None,
    download: bool = False,
    eos_token_id: int | None = None,
    checkpoint: str | None = None,
    name: str | None = None,
    config_key: str = "model",
) -> CausalLM:
    """A causal LM from a config (`family`, `config`) or from weights (`pretrained`): see the module
    docstring. `checkpoint` then loads weights kdlab saved (a stored teacher, a run's student.pt);
    `name` is the config's label, unused here."""
    try:
        import transformers
    except ImportError as error:
        raise KdlabError(
            "Language models need the transformers package: pip install 'transformers>=4.45', then rerun."
        ) from error
    if (family is None) == (pretrained is None):
        raise KdlabError(
            f"{config_key} needs one of {config_key}.family (build a model from a config, e.g. gpt2) or "
            f"{config_key}.pretrained (a directory of weights, or a hub id with {config_key}.download=true)."
        )
    if pretrained is not None:
        model = _from_pretrained(transformers, pretrained, download, config_key)
    else:
        model = _from_config(
            transformers, family, dict(config or {}), vocab_size, seq_len, eos_token_id, config_key
        )
    lm = CausalLM(model)
    if lm.vocab_size != vocab_size:
        raise KdlabError(
            f"{config_key} has a vocabulary of {lm.vocab_size} tokens, but the data's tokenizer makes "
            f"{vocab_size}: teacher, student and data must share one tokenizer (cross-tokenizer distillation "
            "is not supported yet). Use the tokenizer the model was trained with, or a model built for the "
            "data's."
        )
    if seq_len > lm.context:
        raise KdlabError(
            f"data.seq_len={seq_len} is longer than {config_key}'s context of {lm.context} tokens. Set "
            f"data.seq_len={lm.context} or less, or give the model a longer context."
        )
    if checkpoint is not None:
        load_weights(lm, checkpoint)
    return lm


def _from_config(transformers, family, config, vocab_size, seq_len, eos_token_id, key) -> nn.Module:
    if family not in transformers.CONFIG_MAPPING:
        import difflib

        similar = difflib.get_close_matches(family, list(transformers.CONFIG_MAPPING.keys()), n=3)
        hint = f" Similar: {', '.join(similar)}." if similar else ""
        raise KdlabError(
            f"{key}.family={family!r} is not a transformers model type.{hint} Use one such as gpt2 or llama."
        )
    config.setdefault("vocab_size", vocab_size)
    defaults = transformers.CONFIG_MAPPING[family]()
    context_key = "n_positions" if hasattr(defaults, "n_positions") else "max_position_embeddings"
    config.setdefault(context_key, seq_len)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # The family's own ids (GPT-2's 50256) are not tokens of a tokenizer kdlab trained.
        config.setdefault(name, eos_token_id)
    try:
        built = transformers.AutoConfig.for_model(family, **config)
        return transformers.AutoModelForCausalLM.from_config(built)
    except (TypeError, ValueError) as error:
        raise KdlabError(
            f"transformers could not build a {family} causal LM from {key}.config={config}: {error}. Check "
            "the option names and sizes (e.g. hidden size divisible by the head count)."
        ) from error


def _from_pretrained(transformers, pretrained: str, download: bool, key: str) -> nn.Module:
    local = Path(pretrained).expanduser()
    if not local.exists() and not download:
        raise KdlabError(
            f"{key}.pretrained={pretrained!r} is not a local directory, and a run downloads nothing unless "
            f"asked. Point it at a directory holding the model's config and weights (save_pretrained's), or "
            f"set {key}.download=true to let transformers fetch it from the hub."
        )
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(local) if local.exists() else pretrained, local_files_only=not download
        )
    except (OSError, ValueError) as error:
        where = f"the directory {local}" if local.exists() else "the hub"
        raise KdlabError(
            f"{key}.pretrained={pretrained!r}: loading a causal LM from {where} failed "
            f"({str(error).splitlines()[0]}). Without network access, download it on another machine and "
            f"set {key}.pretrained to its directory."
        ) from error


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2**31 - 1  # no learned positions: any length


def _tap_points(lm: CausalLM) -> dict[str, str]:
    """stage1..N: the decoder's blocks; embedding: its final norm (what the LM head reads)."""
    decoder = lm.model.get_decoder()
    path = next(name for name, module in lm.named_modules() if module is decoder)
    points = {}
    blocks = next((name for name in _BLOCKS if isinstance(getattr(decoder, name, None), nn.ModuleList)), None)
    if blocks is not None:
        for i, block in enumerate(getattr(decoder, blocks)):
            points[f"stage{i + 1}"] = f"{path}.{blocks}.{i}"
            norm = next((name for name in _ATTENTION_NORM if hasattr(block, name)), None)
            if norm is not None:
                points[f"stage{i + 1}_attention_input"] = f"{path}.{blocks}.{i}.{norm}"
    norm = next((name for name in _FINAL_NORM if isinstance(getattr(decoder, name, None), nn.Module)), None)
    if norm is not None:
        points["embedding"] = f"{path}.{norm}"
    return points


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    raise KdlabError(
        f"{type(module).__name__} has none of the submodules {', '.join(names)} kdlab looks for in a "
        "decoder block."
    )
