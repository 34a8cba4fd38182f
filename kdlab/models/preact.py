"""Pre-activation tap points: each stage's output before its final ReLU, and the BatchNorm before it.

OFD (Heo et al. 2019) and ReviewKD (Chen et al. 2021) read a stage's features before the ReLU
that ends it, so the negative responses the ReLU would erase are kept. kdlab names them
"stage<k>_preact" next to the models' "stage<k>" points, and records under `norm_points` the
BatchNorm whose statistics describe that pre-activation (OFD's margins come from it).

For post-activation residual networks (the CIFAR ResNets, their bottleneck variant, torchvision's
ResNets) a stage's pre-activation is the input of its last block's final ReLU, and the norm is
that block's last BatchNorm of the residual branch (bn2 in a basic block, bn3 in a bottleneck), as
in the OFD and mdistiller code. Pre-activation networks (WRN) end a stage on a convolution: the
next BatchNorm-ReLU (the next group's first bn1, or the head's bn) gives the pre-activation.
"""

from __future__ import annotations

from torch import nn


def residual_preact_points(model: nn.Module, stages: dict[str, str]) -> tuple[dict, dict]:
    """(tap points, norm points) for a post-activation residual network.

    `stages` maps each stage alias ("stage1") to its nn.Sequential of blocks ("layer1"); each block
    must end `relu(residual + shortcut)` with a `relu` module and a `bn2` or `bn3` BatchNorm.
    """
    modules = dict(model.named_modules())
    taps, norms = {}, {}
    for alias, path in stages.items():
        last = f"{path}.{len(modules[path]) - 1}"
        block = modules[last]
        norm = "bn3" if isinstance(getattr(block, "bn3", None), nn.BatchNorm2d) else "bn2"
        taps[f"{alias}_preact"] = f"{last}.relu:input"
        norms[f"{alias}_preact"] = f"{last}.{norm}"
    return taps, norms


def add_residual_preact_points(model: nn.Module, stages: dict[str, str]) -> None:
    """Give `model` (in place) its stage, embedding and pre-activation tap points and norm points."""
    taps, norms = residual_preact_points(model, stages)
    model.tap_points = {**getattr(model, "tap_points", {}), **stages, **taps}
    model.norm_points = norms
