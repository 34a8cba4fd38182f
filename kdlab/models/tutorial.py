"""The teacher and student CNNs of PyTorch's knowledge-distillation tutorial.

Source: "Knowledge Distillation Tutorial", PyTorch tutorials,
https://pytorch.org/tutorials/beginner/knowledge_distillation_tutorial.html
`DeepNN` (teacher, about 1.2M parameters at 32x32) and `LightNN` (student, about 0.27M) are
rebuilt here from the layer list in that tutorial. The only generalisation is that the first
convolution takes `in_channels` and the flatten size follows `input_size`; at 3x32x32 (CIFAR-10)
the flatten sizes are the tutorial's 2048 and 1024.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models.registry import register_model


def _flat_side(input_size: int, model: str) -> int:
    """Side of the feature map after the two 2x2 max-pools (each floors odd sides)."""
    if input_size < 4:
        raise KdlabError(
            f"Model '{model}' halves the image twice, so it needs input_size >= 4, got {input_size}. "
            "Set input_size to the side of your (square) images."
        )
    return input_size // 4


@register_model("deepnn")
class DeepNN(nn.Module):
    """The tutorial's teacher: four 3x3 convolutions (128, 64, 64, 32 channels) and a 512-unit MLP."""

    # Each pooling stage's output, and the classifier's hidden layer (after its ReLU).
    tap_points: dict[str, str] = {"stage1": "features.4", "stage2": "features.9", "embedding": "classifier.1"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> None:
        super().__init__()
        side = _flat_side(input_size, "deepnn")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * side * side, 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("lightnn")
class LightNN(nn.Module):
    """The tutorial's student: two 16-channel 3x3 convolutions and a 256-unit MLP."""

    tap_points: dict[str, str] = {"stage1": "features.2", "stage2": "features.5", "embedding": "classifier.1"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> None:
        super().__init__()
        side = _flat_side(input_size, "lightnn")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
