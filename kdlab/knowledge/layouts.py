"""Token and map layouts: a ViT's features as the feature losses read a CNN's.

A vision transformer's blocks return tokens `[B, N, C]`: a few prefix tokens (the class token, DeiT's
distillation token, registers) and then the patch tokens of an h x w grid in row-major order. A CNN's
stages return maps `[B, C, H, W]`. The feature losses compare maps (FitNets' regressor is a 1x1
convolution, AT and NST pool maps to a common size), so a token feature is reshaped into the map of
its patch grid, whichever side it is on: ViT teacher and CNN student, CNN teacher and ViT student, or
two ViTs. The prefix tokens carry no position, so they are dropped; the number of them is the model's
own (`num_prefix_tokens`, as timm's ViTs have it), or else an optional class token: none if the
tokens make a square grid, else one.

A language model's hidden states `[B, T, C]` are a sequence, not a grid: a model that says so
(`sequence_features = True`, as kdlab.models.hf_lm.CausalLM does) has them read as a `[B, C, T, 1]` map,
one column of T positions. A 1x1 convolution on it is then a linear projection of each token (FitNets'
regressor becomes TinyBERT's hidden-state projection, Jiao et al. 2020, Eq. 8), and the losses that pool
or flatten a map do so over the positions. Other tokens that are not a square grid of patches (tokens
after pooling) have no map, and the error says so rather than reshaping them into a meaningless one.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from kdlab.errors import KdlabError

# Where the model does not say: no prefix token, or a class token.
GUESSED_PREFIXES = (0, 1)


def prefix_tokens(model: nn.Module | None) -> int | None:
    """The model's count of non-patch tokens (timm: `num_prefix_tokens`), or None where it has none."""
    for candidate in (model, getattr(model, "model", None)):
        count = getattr(candidate, "num_prefix_tokens", None)
        if isinstance(count, int):
            return count
    return None


def feature_map(x: Tensor, model: nn.Module | None, what: str) -> Tensor:
    """A feature as the feature losses read it: a map as it is, a sequence model's `[B, T, C]` hidden
    states as a `[B, C, T, 1]` map, a ViT's tokens as the map of their patch grid (`tokens_to_map`)."""
    if x.ndim == 3 and getattr(model, "sequence_features", False):
        return x.transpose(1, 2).unsqueeze(-1)
    return tokens_to_map(x, prefix_tokens(model), what)


def tokens_to_map(x: Tensor, prefix: int | None, what: str) -> Tensor:
    """`[B, N, C]` tokens as the `[B, C, h, w]` map of their patch grid, the `prefix` first tokens dropped.

    `what` names the feature for the error (e.g. "the student's 'blocks.1'").
    """
    if x.ndim != 3:
        return x
    batch, count, channels = x.shape
    candidates = [prefix] if prefix is not None else GUESSED_PREFIXES
    for skip in candidates:
        patches = count - skip
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            grid = x[:, skip:, :].transpose(1, 2)  # [B, C, h*w], patches in row-major order
            return grid.reshape(batch, channels, side, side)
    told = f"the model's {prefix} prefix token(s)" if prefix is not None else "no token or a class token"
    raise KdlabError(
        f"{what} is a sequence of {count} tokens of width {channels}, and dropping {told} does not leave "
        "a square grid of patches, so it has no map layout to compare with the other model's feature. "
        "Feature losses read patch tokens (a ViT block's output) or maps (a CNN stage); choose such a "
        "layer in the loss's student_layers/teacher_layers, or use a relation or response loss, which "
        "read the embedding or the logits."
    )
