"""Wide ResNets of the CRD distillation benchmark (wrn_16_2, wrn_40_1, wrn_40_2).

Architecture: Zagoruyko & Komodakis 2016, "Wide Residual Networks" (BMVC), table 1: a 3x3
stem of 16 channels, three groups of N = (depth - 4) / 6 pre-activation basic blocks of widths
16k, 32k and 64k (k = widening factor; the 2nd and 3rd groups halve the resolution), a final
BN-ReLU, global average pooling and a linear head. Variant: the one used by Tian et al. 2020,
"Contrastive Representation Distillation" (ICLR), in their RepDistiller code (models/wrn.py):
dropout 0 (so no dropout layer at all here), bias-free convolutions, 1x1 projection shortcuts
only where the width changes.
As in cifar_resnet.py, pooling is AdaptiveAvgPool2d(1) instead of the reference's
AvgPool2d(8): identical on 32x32 inputs (8x8 final map), and it also handles e.g. 28x28 images.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models.registry import register_model
from kdlab.models.weight_init import he_fan_out_init


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut (the WRN paper's "B(3,3)" block)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bn1 makes a new tensor, so the in-place ReLU never overwrites x (or a tapped stage output).
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # The projection reads the pre-activated input, as in the WRN reference code; an identity
        # shortcut adds the raw input.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k: stem, block1 (stride 1), block2 and block3 (stride 2), BN-ReLU, pool, fc."""

    # Each group's output (before the final BN-ReLU, as RepDistiller's features), and the pool.
    tap_points: dict[str, str] = {
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3",
        "embedding": "avgpool",
    }

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise KdlabError(
                f"A Wide ResNet has depth 6N+4 (10, 16, 22, 28, 40, ...), got {depth}. "
                "Pick one of the registered wrn_<depth>_<k> names."
            )
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = self._make_group(widths[0], widths[1], blocks, stride=1)
        self.block2 = self._make_group(widths[1], widths[2], blocks, stride=2)
        self.block3 = self._make_group(widths[2], widths[3], blocks, stride=2)
        # Pre-activation blocks end on a convolution, so the head normalises and activates.
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        he_fan_out_init(self)
        nn.init.zeros_(self.fc.bias)  # the reference zeroes the head's bias, keeps its default weight
        # Before each stage's activation (kdlab.models.preact): the next BN-ReLU's input is the
        # stage output itself, so the pre-activation is that BatchNorm's output, the ReLU's input.
        self.tap_points = {
            **self.tap_points,
            "stage1_preact": "block2.0.relu1:input",
            "stage2_preact": "block3.0.relu1:input",
            "stage3_preact": "relu:input",
        }
        self.norm_points = {
            "stage1_preact": "block2.0.bn1",
            "stage2_preact": "block3.0.bn1",
            "stage3_preact": "bn",
        }

    @staticmethod
    def _make_group(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBlock(in_planes, planes, stride)]
        layers += [PreActBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# input_size is accepted for the common constructor signature; global pooling makes it irrelevant.


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> WideResNet:
    """WRN-16-2 (N=2, widths 16/32/64/128); 0.70M parameters at 100 classes."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> WideResNet:
    """WRN-40-1 (N=6, widths 16/16/32/64); 0.57M parameters at 100 classes."""
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> WideResNet:
    """WRN-40-2 (N=6, widths 16/32/64/128); 2.26M parameters at 100 classes."""
    return WideResNet(40, 2, num_classes, in_channels)
