"""The CIFAR ResNet-50 of the CRD distillation benchmark (resnet50).

Architecture: He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR), table 1:
four stages of [3, 4, 6, 3] bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4; widths
64/128/256/512, outputs 256/512/1024/2048), 1x1-conv + BN projection shortcuts where the shape
changes, and the stride of a downsampling block on its 3x3 conv. CIFAR variant: the one of
Tian et al. 2020, "Contrastive Representation Distillation" (ICLR), RepDistiller code
(models/resnetv2.py, `ResNet50`): the ImageNet stem (7x7 stride-2 conv + 3x3 max-pool) becomes
a 3x3 stride-1 conv with no pooling, so a 32x32 image keeps 32x32 in stage 1 and ends at 4x4.
Pooling is AdaptiveAvgPool2d(1), as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.preact import add_residual_preact_points
from kdlab.models.registry import register_model
from kdlab.models.weight_init import he_fan_out_init

_EXPANSION = 4
_STEM_WIDTH = 64


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3 (stride here)-BN-ReLU, 1x1-BN, plus a shortcut; ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * _EXPANSION
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarBottleneckResNet(nn.Module):
    """conv1-bn1-relu (3x3, stride 1), layer1 (stride 1), layer2..layer4 (stride 2), avgpool, fc."""

    tap_points: dict[str, str] = {
        "stage1": "layer1",
        "stage2": "layer2",
        "stage3": "layer3",
        "stage4": "layer4",
        "embedding": "avgpool",
    }

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STEM_WIDTH, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        width = _STEM_WIDTH
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = [Bottleneck(width, planes, stride=1 if i == 0 else 2)]
            width = planes * _EXPANSION
            layers += [Bottleneck(width, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        he_fan_out_init(self)  # the reference keeps PyTorch's default init for the Linear head
        add_residual_preact_points(self, {f"stage{i}": f"layer{i}" for i in (1, 2, 3, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet50")
def resnet50(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarBottleneckResNet:
    """CIFAR ResNet-50, bottleneck blocks [3, 4, 6, 3]; 23.71M parameters at 100 classes."""
    # input_size is accepted for the common constructor signature; global pooling makes it irrelevant.
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes, in_channels)
