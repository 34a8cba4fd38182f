"""The parts of a source model that losses may use: its classifier and its BatchNorm statistics.

SRD and SimKD pass the student's features through the teacher's classifier; SDD classifies
local regions with it; OFD takes its margins from the BatchNorm before a pre-activation tap. A
loss reaches these parts through `Outputs.model`, the live model, never a copy, so a frozen
teacher stays frozen and a peer's current head is used. `through_classifier` calls the real
classifier with its parameters detached: the gradient reaches the features passed in, never the
source, whatever the scheme (a frozen teacher, a peer being trained, an exit).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from kdlab.errors import KdlabError
from kdlab.taps import resolve_layer

# Attribute names classification models give their final linear layer (timm: get_classifier()).
CLASSIFIER_NAMES = ("fc", "classifier", "linear", "head")


def classifier_of(model: nn.Module | None, loss: str = "this loss") -> nn.Module:
    """The model's final classifier module: timm's `get_classifier()`, else fc/classifier/linear/head."""
    if model is None:
        raise KdlabError(
            f"{loss} passes features through the source model's classifier, but this scheme's source has "
            "no model of its own (e.g. an ensemble or a bank of past predictions). Use it with a frozen "
            "teacher (mode=offline) or peers (mode=online)."
        )
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    for name in CLASSIFIER_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise KdlabError(
        f"{loss} needs the source model's classifier, but {type(model).__name__} has none of the "
        f"attributes {', '.join(CLASSIFIER_NAMES)} and no get_classifier(). Give the model one of them "
        "(its final nn.Linear), or pick a loss that does not use the teacher's head."
    )


def through_classifier(model: nn.Module | None, features: Tensor, loss: str = "this loss") -> Tensor:
    """`features` through the source's real classifier, with its parameters detached."""
    head = classifier_of(model, loss)
    params = {name: p.detach() for name, p in head.named_parameters()}
    return functional_call(head, params, (features,))


def classifier_in_features(model: nn.Module | None, loss: str = "this loss") -> int:
    """The width of the features the source's classifier reads (its first Linear's in_features)."""
    head = classifier_of(model, loss)
    linear = (
        head
        if isinstance(head, nn.Linear)
        else next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    )
    if linear is None:
        raise KdlabError(
            f"{loss} needs a linear classifier on the source, but {type(head).__name__} has none."
        )
    return linear.in_features


def norm_before(model: nn.Module | None, layer: str, loss: str = "this loss") -> nn.BatchNorm2d:
    """The BatchNorm whose statistics describe the pre-activation tap `layer` (a model's norm_points)."""
    points = getattr(model, "norm_points", {}) if model is not None else {}
    if layer not in points:
        known = ", ".join(points) or "none"
        raise KdlabError(
            f"{loss} reads the BatchNorm before the source's layer '{layer}', but "
            f"{type(model).__name__ if model is not None else 'the source'} names no BatchNorm for it "
            f"(its norm points: {known}). Use pre-activation tap points (e.g. stage2_preact) of a CIFAR "
            "ResNet, WRN or torchvision ResNet teacher, or give the model a `norm_points` dict."
        )
    modules = dict(model.named_modules())
    return modules[resolve_layer(model, points[layer]) if points[layer] not in modules else points[layer]]
