"""CIFAR VGGs of the CRD distillation benchmark (vgg8, vgg13), with BatchNorm.

Architecture: Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale
Image Recognition" (ICLR), configuration B for VGG-13, in the CIFAR form used by Tian et al.
2020, "Contrastive Representation Distillation" (ICLR), RepDistiller code (models/vgg.py):
five groups of 3x3 conv-BN-ReLU layers (convolutions with bias), widths 64/128/256/512/512,
with 2 convolutions per group for vgg13 and 1 for vgg8 (RepDistiller's config "S"), global
average pooling and a single Linear(512, num_classes) instead of VGG's three-layer classifier.
Resolution: a 2x2 max-pool follows groups 0, 1 and 2. The reference applies the pool after
group 3 only to 64x64 inputs, so on 32x32 CIFAR groups 3 and 4 both run at 4x4; here that
choice is made once from `input_size` (pool when input_size >= 64), so the module structure,
and therefore every tap point, is fixed at construction.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.registry import register_model
from kdlab.models.weight_init import he_fan_out_init

# Output widths of the convolutions in groups 0..4.
_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def _conv_group(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3x3-BN-ReLU per width; the group's ReLU output is its feature map."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """block0, pool0, block1, pool1, block2, pool2, block3, pool3, block4, avgpool, classifier."""

    # The outputs of groups 1..4 (RepDistiller's features f1..f4; group 0 plays the stem), the pool.
    tap_points: dict[str, str] = {
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3",
        "stage4": "block4",
        "embedding": "avgpool",
    }

    def __init__(
        self,
        groups: tuple[tuple[int, ...], ...],
        num_classes: int,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [group[-1] for group in groups]
        for i, group in enumerate(groups):
            self.add_module(f"block{i}", _conv_group(widths[i], group))
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
            elif i == 3:
                # Keep a 4x4 map for block4 on both 32x32 and 64x64 inputs, as the reference does.
                self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2) if input_size >= 64 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)
        he_fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.pool3(self.block3(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("vgg8")
def vgg8(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarVGG:
    """VGG-8 with BN (one conv per group); 3.97M parameters at 100 classes (3,965,028)."""
    return CifarVGG(_VGG8, num_classes, in_channels, input_size)


@register_model("vgg13")
def vgg13(num_classes: int = 100, in_channels: int = 3, input_size: int = 32) -> CifarVGG:
    """VGG-13 with BN (two convs per group); 9.46M parameters at 100 classes."""
    return CifarVGG(_VGG13, num_classes, in_channels, input_size)
