"""ShuffleNetV1 and V2 of the CRD distillation benchmark (shufflev1, shufflev2), CIFAR versions.

Architectures: Zhang et al. 2018, "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices" (CVPR), table 1 with g = 3 (stage widths 240/480/960, 4/8/4 units),
and Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(ECCV), table 5 at 1x (stage widths 116/232/464, 4/8/4 units, 1x1 conv to 1024). The CIFAR
versions are those of Tian et al. 2020, "Contrastive Representation Distillation" (ICLR),
RepDistiller code (models/ShuffleNetv1.py, ShuffleNetv2.py): the ImageNet stem (3x3 stride-2
conv + max-pool) becomes a 1x1 conv to 24 channels at full resolution, so the three stride-2
stages take a 32x32 image to 4x4. In V1 each bottleneck's width is a quarter of its output
(of the residual branch's output in a stride-2 unit, which concatenates the pooled input), and
the reference adds a ReLU after the depthwise conv that the paper does not have; it is kept here,
since the CRD numbers were obtained with it.
Pooling is AdaptiveAvgPool2d(1), identical to the reference's AvgPool2d(4) on 32x32 inputs.
Neither reference re-initialises weights, so PyTorch's default initialisation is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.registry import register_model

_STEM_WIDTH = 24


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` groups, so grouped convolutions see each other's outputs."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stem(in_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_channels, _STEM_WIDTH, kernel_size=1, bias=False), nn.BatchNorm2d(_STEM_WIDTH)


def _depthwise3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


def _pointwise(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, groups=groups, bias=False)


# --- ShuffleNetV1 --------------------------------------------------------------------------------


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1-BN-ReLU, shuffle, depthwise 3x3-BN-ReLU, grouped 1x1-BN; add (or concat), ReLU.

    A stride-2 unit concatenates a 3x3 average-pooled copy of its input, so its branch produces
    only out_channels - in_channels channels (the paper's fig. 2c).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first: bool) -> None:
        super().__init__()
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = branch // 4
        # The paper leaves the network's first pointwise layer ungrouped: its input is too narrow.
        self.conv1 = _pointwise(in_channels, mid, groups=1 if first else groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(1 if first else groups)
        # The paper's unit has no ReLU after the depthwise conv (fig. 2b); RepDistiller's, used for
        # all CRD results, has one, and this follows RepDistiller (see forward).
        self.conv2 = _depthwise3x3(mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pointwise(mid, branch, groups=groups)
        self.bn3 = nn.BatchNorm2d(branch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.cat([out, self.shortcut(x)], 1) if self.shortcut is not None else out + x
        return self.relu(out)


class ShuffleNetV1(nn.Module):
    """conv1-bn1-relu (1x1), layer1..layer3 (each starting with a stride-2 unit), avgpool, linear."""

    tap_points: dict[str, str] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "embedding": "avgpool",
    }

    def __init__(
        self,
        widths: tuple[int, int, int],
        units: tuple[int, int, int],
        groups: int,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _stem(in_channels)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], _STEM_WIDTH
        for out_width, n in zip(widths, units, strict=True):
            layers = []
            for i in range(n):
                first = not stages and i == 0
                layers.append(ShuffleUnitV1(width, out_width, 2 if i == 0 else 1, groups, first))
                width = out_width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


# --- ShuffleNetV2 --------------------------------------------------------------------------------


class ShuffleUnitV2(nn.Module):
    """Split the channels in half; one half passes, the other goes 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU.

    The halves are concatenated and shuffled (the paper's fig. 3c).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = _pointwise(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _depthwise3x3(half, stride=1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _pointwise(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, branch = x.chunk(2, dim=1)
        branch = self.relu(self.bn1(self.conv1(branch)))
        branch = self.relu(self.bn3(self.conv3(self.bn2(self.conv2(branch)))))
        return self.shuffle(torch.cat([passed, branch], 1))


class DownUnitV2(nn.Module):
    """The stride-2 unit: both branches see the whole input and each gives half the output (fig. 3d)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        # Left branch: dw3x3 (stride 2)-BN, 1x1-BN-ReLU.
        self.conv1 = _depthwise3x3(in_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pointwise(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        # Right branch: 1x1-BN-ReLU, dw3x3 (stride 2)-BN, 1x1-BN-ReLU.
        self.conv3 = _pointwise(in_channels, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = _depthwise3x3(half, stride=2)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = _pointwise(half, half)
        self.bn5 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """conv1-bn1-relu (1x1), layer1..layer3, conv2-bn2-relu (1x1 to 1024), avgpool, linear."""

    # Each stage's output (RepDistiller's f1..f3, before the last 1x1 conv), and the pool.
    tap_points: dict[str, str] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "embedding": "avgpool",
    }

    def __init__(
        self,
        widths: tuple[int, int, int],
        units: tuple[int, int, int],
        last_width: int,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _stem(in_channels)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], _STEM_WIDTH
        for out_width, n in zip(widths, units, strict=True):
            stage = [DownUnitV2(width, out_width)] + [ShuffleUnitV2(out_width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            width = out_width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _pointwise(width, last_width)
        self.bn2 = nn.BatchNorm2d(last_width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


# input_size is accepted for the common constructor signature; global pooling makes it irrelevant.


@register_model("shufflev1")
def shufflev1(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> ShuffleNetV1:
    """ShuffleNetV1, g = 3, stage widths 240/480/960, 4/8/4 units; 0.95M parameters at 100 classes."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)


@register_model("shufflev2")
def shufflev2(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> ShuffleNetV2:
    """ShuffleNetV2 1x, widths 116/232/464, 4/8/4 units, last conv 1024; 1.36M parameters at 100 classes."""
    return ShuffleNetV2((116, 232, 464), (4, 8, 4), 1024, num_classes, in_channels)
