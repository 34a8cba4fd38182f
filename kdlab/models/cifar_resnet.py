"""CIFAR-style ResNets of the CRD distillation benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture: He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2 (the
6n+2-layer CIFAR networks), with the variants and widths used by Tian et al. 2020, "Contrastive
Representation Distillation" (ICLR), and their RepDistiller code (models/resnet.py): a 3x3 stem,
three stages of n BasicBlocks with 1x1-conv + BN projection shortcuts, global average pooling and
a linear head. The "x4" models widen the stem and stages to 32/64/128/256.
One deliberate difference: pooling is AdaptiveAvgPool2d(1) instead of AvgPool2d(8). Both average
the 8x8 map of a 32x32 input, so results and parameter counts are unchanged, but the adaptive
pool also handles other sizes such as 28x28 Fashion-MNIST (7x7 final map).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models.preact import add_residual_preact_points
from kdlab.models.registry import register_model
from kdlab.models.weight_init import he_fan_out_init

# Stem width, then the widths of layer1..layer3.
_PLAIN_WIDTHS = (16, 16, 32, 64)
_X4_WIDTHS = (32, 64, 128, 256)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; ReLU after the sum (He et al. 2016, fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Projection shortcut (option B) wherever the identity cannot be added shape-wise.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """A (6n+2)-layer CIFAR ResNet: stem, layer1 (stride 1), layer2 and layer3 (stride 2), pool, fc."""

    # Named tap points: each stage's output, and the pooled embedding the classifier reads. Each
    # model also gets stage<k>_preact (before the stage's final ReLU; see kdlab.models.preact).
    tap_points: dict[str, str] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "embedding": "avgpool",
    }

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise KdlabError(
                f"A CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}. "
                "Pick one of the registered resnet names."
            )
        blocks = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = _conv3x3(in_channels, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(stem, w1, blocks, stride=1)
        self.layer2 = self._make_stage(w1, w2, blocks, stride=2)
        self.layer3 = self._make_stage(w2, w3, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()
        add_residual_preact_points(self, {f"stage{i}": f"layer{i}" for i in (1, 2, 3)})

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # Only the first block changes resolution/width; the rest keep it.
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        he_fan_out_init(self)  # the CIFAR backbones' scheme: He fan-out convs, identity BatchNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# input_size is accepted for the common constructor signature; global pooling makes it irrelevant.


@register_model("resnet8")
def resnet8(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-8 (n=1), widths 16/16/32/64."""
    return CifarResNet(8, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet14")
def resnet14(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-14 (n=2), widths 16/16/32/64."""
    return CifarResNet(14, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet20")
def resnet20(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-20 (n=3), widths 16/16/32/64; 0.28M parameters at 100 classes."""
    return CifarResNet(20, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-32 (n=5), widths 16/16/32/64; 0.47M parameters at 100 classes."""
    return CifarResNet(32, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-44 (n=7), widths 16/16/32/64."""
    return CifarResNet(44, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-56 (n=9), widths 16/16/32/64; 0.86M parameters at 100 classes."""
    return CifarResNet(56, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-110 (n=18), widths 16/16/32/64; 1.74M parameters at 100 classes."""
    return CifarResNet(110, _PLAIN_WIDTHS, num_classes, in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-8x4 (n=1), widths 32/64/128/256; 1.23M parameters at 100 classes."""
    return CifarResNet(8, _X4_WIDTHS, num_classes, in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-32x4 (n=5), widths 32/64/128/256; 7.43M parameters at 100 classes."""
    return CifarResNet(32, _X4_WIDTHS, num_classes, in_channels)
