"""Weight initialisation shared by the CRD-benchmark CIFAR models.

RepDistiller (Tian et al. 2020, https://github.com/HobbitLong/RepDistiller) initialises its
WRN, VGG, MobileNetV2 and ResNet50 the same way: convolutions from N(0, 2 / (k * k * out_channels))
(He et al. 2015, "Delving Deep into Rectifiers", fan-out mode), BatchNorm as the identity map
and zero convolution biases. VGG and MobileNetV2 also draw the classifier from N(0, 0.01) with
a zero bias; the others leave it to the model (PyTorch's default Linear init).
"""

from __future__ import annotations

from torch import nn


def he_fan_out_init(model: nn.Module, linear_std: float | None = None) -> None:
    """He fan-out init for convolutions, identity BatchNorm, zero convolution biases.

    `linear_std`: draw Linear weights from N(0, linear_std) and zero their biases; None leaves
    Linear layers as PyTorch built them.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # PyTorch's fan_out is out_channels * k * k (groups do not enter), exactly the
            # reference's n, so depthwise convolutions get the same std there and here.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
