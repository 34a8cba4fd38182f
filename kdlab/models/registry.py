"""Name -> constructor registry for every network kdlab can train or distil.

kdlab's own models register themselves with `@register_model("name")`; their constructors
take `(num_classes=..., in_channels=..., input_size=...)`. Any torchvision classification
model is reachable as `torchvision/<name>` and is built by `torchvision.models.get_model`
(see https://pytorch.org/vision/stable/models.html#general-information-on-pre-trained-weights),
and any timm model as `timm/<name>` (kdlab/models/timm_models.py).
`create_model` is the single entry point the Hydra configs in `conf/model/` call.

A model of your own needs no change to kdlab: name its constructor by import path
(`name: mypackage.models.MyNet`, called with the same three arguments), or decorate it with
`@register_model("mynet")` in a module that `name: mypackage.models:mynet` imports first.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models.checkpoint import load_weights
from kdlab.models.inputs import attach_input_conversion, model_input
from kdlab.models.preact import add_residual_preact_points
from kdlab.models.timm_models import TIMM_PREFIX, create_timm

TORCHVISION_PREFIX = "torchvision/"
RESERVED_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor (class or function) buildable by `name`."""

    def decorate(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise KdlabError(
                f"A model named '{name}' is already registered (by {_REGISTRY[name].__qualname__}). "
                "Model names must be unique: register the new model under a different name."
            )
        if name.startswith(RESERVED_PREFIXES):
            raise KdlabError(
                f"Cannot register '{name}': names starting with {' or '.join(RESERVED_PREFIXES)} are "
                "reserved for torchvision and timm models. Register the model under another name."
            )
        _REGISTRY[name] = constructor
        return constructor

    return decorate


def list_models() -> list[str]:
    """Names of all registered kdlab models, sorted (torchvision models are not listed)."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    checkpoint: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data_input: Mapping[str, Any] | None = None,
    config_key: str = "model",
    **kwargs,
) -> nn.Module:
    """Build model `name` (a registered kdlab name, `torchvision/<name>` or `timm/<name>`), optionally
    loading weights.

    `in_channels`, `input_size`, `mean` and `std` are the model's own input (null statistics: the
    data's). Given `data_input`, the data's (`in_channels`, `input_size`, `mean`, `std`), a model whose
    input differs converts each batch to its own (kdlab/models/inputs.py). `config_key` is the config
    node the model comes from ("teacher", "student"), named in errors. `kwargs` go to the constructor
    unchanged (e.g. `weights=` for torchvision models, `pretrained=` and timm's own options such as
    `depth=` for timm models).
    """
    # Checked before building: a bad setting costs no model construction (or download).
    conversion = model_input(in_channels, input_size, mean, std, data_input, config_key)
    if name.startswith(TIMM_PREFIX):
        model = create_timm(name[len(TIMM_PREFIX) :], num_classes, in_channels, input_size, **kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _create_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels, kwargs)
    else:
        model = _create_kdlab(name, num_classes, in_channels, input_size, kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if conversion is not None:
        attach_input_conversion(model, conversion)
    return model


def _constructor_by_path(name: str) -> Callable[..., nn.Module] | None:
    """`package.module.Constructor`, or `package.module:registered_name` (imported first, so its
    `@register_model` runs); None when `name` is not such a path or does not import."""
    if ":" in name:
        module, registered = name.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError:
            return None
        return _REGISTRY.get(registered)
    if "." not in name:
        return None
    module, attribute = name.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), attribute, None)
    except ImportError:
        return None


def _create_kdlab(name: str, num_classes: int, in_channels: int, input_size: int, kwargs: dict) -> nn.Module:
    constructor = _REGISTRY.get(name) or _constructor_by_path(name)
    if constructor is None:
        raise KdlabError(
            f"Unknown model '{name}'. Registered kdlab models are: {', '.join(list_models())}. "
            f"Any torchvision classification model can also be used as '{TORCHVISION_PREFIX}<name>', "
            "and a model of your own by its import path ('mypackage.models.MyNet') "
            f"(for example '{TORCHVISION_PREFIX}resnet18'). Fix the model name in your config or on the "
            "command line."
        )
    # Check extra options up front so a typo gets a clear message rather than a TypeError.
    params = inspect.signature(constructor).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params and not takes_any)
    if unknown:
        raise KdlabError(
            f"Model '{name}' does not take the option(s) {', '.join(unknown)}. Remove them from the model "
            "config (options such as `weights` only apply to torchvision models)."
        )
    return constructor(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)


def _create_torchvision(tv_name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    available = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in available:
        similar = difflib.get_close_matches(tv_name, available, n=5, cutoff=0.4)
        hint = f"Similar names: {', '.join(similar)}. " if similar else ""
        raise KdlabError(
            f"'{tv_name}' is not a torchvision classification model. {hint}"
            "See torchvision.models.list_models(module=torchvision.models) for the full list and use "
            f"'{TORCHVISION_PREFIX}<name>' with one of those names."
        )
    if in_channels not in (1, 3):
        raise KdlabError(
            f"torchvision models take 3-channel images (1-channel images are expanded to 3), but "
            f"in_channels={in_channels} was asked for '{TORCHVISION_PREFIX}{tv_name}'. Use a dataset with 1 "
            "or 3 channels, or a kdlab model, whose first convolution takes any number of channels."
        )
    extra = {k: v for k, v in kwargs.items() if k != "weights"}
    try:
        model = torchvision.models.get_model(
            tv_name, weights=kwargs.get("weights"), num_classes=num_classes, **extra
        )
    except ValueError as exc:
        # torchvision reports e.g. pretrained weights whose head size differs from num_classes this way.
        raise KdlabError(
            f"torchvision could not build '{tv_name}': {exc}. Pretrained `weights` fix num_classes to the "
            "class count they were trained with; use `weights: null`, or load a fine-tuned checkpoint "
            "through the `checkpoint` option instead."
        ) from exc
    if in_channels == 1:
        model.register_forward_pre_hook(gray_to_rgb)
    if isinstance(model, torchvision.models.ResNet):
        # Named tap points as kdlab's own ResNets have them (stages, pre-activations, embedding).
        model.tap_points = {"embedding": "avgpool"}
        add_residual_preact_points(model, {f"stage{i}": f"layer{i}" for i in (1, 2, 3, 4)})
    return model


def gray_to_rgb(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: repeat a 1-channel image batch over 3 channels.

    A module-level function (not a lambda or wrapper module) so hooked models stay picklable and
    deep-copyable and keep torchvision's own module paths.
    """
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 1:
        # expand() is a view: no copy of the image data is made.
        return (x.expand(-1, 3, -1, -1), *args[1:])
    return args


gray_to_rgb.part_of_model = True  # kdlab.efficiency keeps it on the copy it measures
