"""Token and map layouts: a ViT's features as the feature losses read a CNN's.

A vision transformer's blocks return tokens `[B, N, C]`: a few prefix tokens (the class token, DeiT's
distillation token, registers) and then the patch tokens of an h x w grid in row-major order. A CNN's
stages return maps `[B, C, H, W]`. The feature losses compare maps (FitNets' regressor is a 1x1
convolution, AT and NST pool maps to a common size), so a token feature is reshaped into the map of
its patch grid, whichever side it is on: ViT teacher and CNN student, CNN teacher and ViT student, or
two ViTs. The prefix tokens carry no position, so they are dropped; the number of them is the model's
own (`num_prefix_tokens`, as timm's ViTs have it), or else an optional class token: none if the
tokens make a square grid, else one.

Tokens that are not a square grid of patches (a sequence model, tokens after pooling) have no map,
and the error says so rather than reshaping them into a meaningless one.
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
