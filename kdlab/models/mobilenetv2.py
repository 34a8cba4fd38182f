"""MobileNetV2 of the CRD distillation benchmark ("mobilenetv2": width 0.5, expansion 6).

Architecture: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(CVPR), table 2: a stride-2 3x3 stem, seven groups of inverted-residual blocks (expansion t,
output width c, n repeats, first stride s), a 1x1 conv to 1280 channels, global pooling and a
linear head. Variant: RepDistiller's `mobile_half` (Tian et al. 2020, "Contrastive
Representation Distillation", ICLR; models/mobilenetv2.py), which the CRD tables call
"MobileNetV2": width multiplier 0.5 on the stem and every group (the 1280-channel last conv is
not narrowed), expansion 6 in groups 2-7, and for CIFAR the second group's stride is 1 rather
than 2, so a 32x32 image ends on a 2x2 map. As in the reference, every block starts with the
1x1 expansion conv, even the first group's with t = 1 (torchvision omits that layer there);
this counts toward the reference's parameter total.
Pooling is AdaptiveAvgPool2d(1), identical to the reference's AvgPool2d on 32x32 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.registry import register_model
from kdlab.models.weight_init import he_fan_out_init

# (expansion t, output width c, repeats n, first stride s) per group, before the width multiplier.
_GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_WIDTH = 32
_LAST_WIDTH = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN (+ input if shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # No ReLU after the projection: the paper's "linear bottleneck".
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """conv1 (stride 2), blocks.0 .. blocks.6 (the seven groups), conv2 (1x1), avgpool, classifier."""

    # The last group of each resolution (RepDistiller's f1..f4: 16, 8, 4, 2 px on CIFAR), the pool.
    tap_points: dict[str, str] = {
        "stage1": "blocks.1",
        "stage2": "blocks.2",
        "stage3": "blocks.4",
        "stage4": "blocks.6",
        "embedding": "avgpool",
    }

    def __init__(
        self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6
    ) -> None:
        super().__init__()
        width = int(_STEM_WIDTH * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, width, kernel_size=3, stride=2)
        groups = []
        for t, c, n, s in _GROUPS:
            out_width = int(c * width_mult)
            # The first group keeps its expansion of 1; `expansion` sets the others.
            t = t if t == 1 else expansion
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(width, out_width, s if i == 0 else 1, t))
                width = out_width
            groups.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(groups)
        self.conv2 = _conv_bn_relu(width, _LAST_WIDTH, kernel_size=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(_LAST_WIDTH, num_classes)
        he_fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> MobileNetV2:
    """RepDistiller's mobile_half: MobileNetV2 at width 0.5, expansion 6; 0.81M parameters at 100 classes."""
    # input_size is accepted for the common constructor signature; global pooling makes it irrelevant.
    return MobileNetV2(num_classes, in_channels, width_mult=0.5, expansion=6)
