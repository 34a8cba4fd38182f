"""Each model's own view of a batch: its input size, channels and normalisation.

The data loader yields each sample once, at the data's size and normalised with the data's
statistics (`data.input_size`, `data.in_channels`, `data.mean`, `data.std`). A model may be
configured for other inputs, e.g. a teacher pretrained on ImageNet, which expects 224 px RGB images
normalised with ImageNet's statistics, distilled into a student at the data's native 28 px:

    teacher.input_size=224 teacher.in_channels=3
    teacher.mean=[0.485,0.456,0.406] teacher.std=[0.229,0.224,0.225]

Such a model converts every batch to its own input as the first step of its forward pass (a
forward pre-hook, `ConvertInput`), so each model sees its own view of the same augmented sample
(the same crop and flip) wherever it is called: in training, in evaluation, in the teacher-output
cache, in the efficiency measurement and in the exported ONNX file. The conversion undoes the data's
normalisation, repeats a 1-channel image over the model's 3 channels, resizes to the model's size
(torchvision's bilinear resize, antialiased when it shrinks) and normalises with the model's
statistics. The two normalisations fold into one scale and shift per channel, and both commute
with the resize, whose weights sum to 1.

A model whose inputs match the data's gets no hook: its module paths, weights and speed are those
of the bare model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from kdlab.errors import KdlabError


@dataclass(frozen=True)
class InputSpec:
    """What a tensor of images is: channels, square size, and the statistics it is normalised with."""

    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ConvertInput:
    """Forward pre-hook: a batch in the data's form (`data`) becomes one in the model's (`model`).

    A module-level class holding plain floats, so that hooked models deep-copy, pickle (DDP spawn)
    and compile; the scale and shift tensors are made once per device and dtype.
    """

    # kdlab.efficiency keeps this hook on the copy it measures: it is part of the deployed model.
    part_of_model = True

    def __init__(self, data: InputSpec, model: InputSpec):
        self.data, self.model = data, model
        # x_model = (x_data * std_d + mean_d - mean_m) / std_m, per model channel.
        mean_d, std_d = _per_channel(data.mean, model.in_channels), _per_channel(data.std, model.in_channels)
        self.scale = [sd / sm for sd, sm in zip(std_d, model.std, strict=True)]
        self.shift = [(md - mm) / sm for md, mm, sm in zip(mean_d, model.mean, model.std, strict=True)]
        self.normalises = any(s != 1 for s in self.scale) or any(b != 0 for b in self.shift)
        self._tensors: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return args
        if x.shape[1] != self.data.in_channels:
            raise KdlabError(
                f"{type(module).__name__} converts {self.data.in_channels}-channel images of the data to its "
                f"own {self.model.in_channels}-channel {self.model.input_size} px input, but was given a "
                f"batch of shape {tuple(x.shape)}. Give it the data's images as the loader yields them."
            )
        if self.model.in_channels != self.data.in_channels:
            x = x.expand(-1, self.model.in_channels, -1, -1)
        if self.normalises:
            scale, shift = self._scale_shift(x)
            x = torch.addcmul(shift, x, scale)
        if x.shape[-2:] != (self.model.input_size, self.model.input_size):
            x = TF.resize(x, [self.model.input_size, self.model.input_size], antialias=True)
        return (x, *args[1:])

    def _scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._tensors:
            shape = (1, self.model.in_channels, 1, 1)
            self._tensors[key] = tuple(
                torch.tensor(values, device=x.device, dtype=x.dtype).view(shape)
                for values in (self.scale, self.shift)
            )
        return self._tensors[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tensors": {}}  # device tensors are remade where the copy runs

    def __repr__(self) -> str:
        return f"ConvertInput(data={self.data}, model={self.model})"


def model_input(
    in_channels: int,
    input_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    data_input: dict[str, Any] | None,
    key: str = "model",
) -> tuple[InputSpec, InputSpec] | None:
    """The (data, model) input specs of a model configured with these values, or None when it takes
    the data's inputs as they are (or no data is given: a model built outside a run).

    `key` is the config node the values come from ("teacher", "student"), named in the errors.
    """
    if not data_input:
        return None
    if data_input.get("mean") is None or data_input.get("std") is None:
        if (in_channels, input_size, mean, std) == (
            data_input["in_channels"],
            data_input["input_size"],
            None,
            None,
        ):
            return None  # the model takes the data's inputs; their statistics do not matter
        raise KdlabError(
            f"{key} is set for inputs other than the data's ({key}.in_channels, input_size, mean or std), "
            f"but the data config gives no data.mean and data.std to convert from. Add the statistics its "
            f"inputs are normalised with to the data config (e.g. mean: [0.5], std: [0.5]), or leave "
            f"{key}'s input settings at the data's."
        )
    data = InputSpec(
        int(data_input["in_channels"]),
        int(data_input["input_size"]),
        _floats(data_input["mean"], "data.mean"),
        _floats(data_input["std"], "data.std"),
    )
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise KdlabError(
            f"{key}.{given} is set but {key}.{missing} is not: a model's input statistics go together. "
            f"Set {key}.{missing} as well (ImageNet's: mean [0.485,0.456,0.406], std [0.229,0.224,0.225]), "
            f"or neither, for the data's statistics."
        )
    if in_channels != data.in_channels and data.in_channels != 1:
        raise KdlabError(
            f"{key}.in_channels={in_channels}, but the data's images have {data.in_channels} channels. "
            f"kdlab repeats a 1-channel image over a model's channels, and converts nothing else: set "
            f"{key}.in_channels={data.in_channels} (the default, ${{data.in_channels}})."
        )
    if mean is None:
        mean, std = _per_channel(data.mean, in_channels), _per_channel(data.std, in_channels)
    model = InputSpec(in_channels, input_size, _floats(mean, f"{key}.mean"), _floats(std, f"{key}.std"))
    for name, values in (("mean", model.mean), ("std", model.std)):
        if len(values) != in_channels:
            raise KdlabError(
                f"{key}.{name} has {len(values)} values for a model of {in_channels} input channels "
                f"({key}.in_channels): give one value per channel, e.g. "
                f"{key}.{name}=[{','.join(['0.5'] * in_channels)}]."
            )
    if any(s <= 0 for s in model.std):
        raise KdlabError(f"{key}.std={list(model.std)} must be positive: it divides each channel.")
    if not isinstance(input_size, int) or input_size < 1:
        raise KdlabError(f"{key}.input_size={input_size!r} must be a positive integer, e.g. 224.")
    same = (model.in_channels, model.input_size) == (data.in_channels, data.input_size)
    if same and _close(model.mean, data.mean) and _close(model.std, data.std):
        return None
    return data, model


def attach_input_conversion(model: nn.Module, specs: tuple[InputSpec, InputSpec]) -> nn.Module:
    """Make `model` convert the data's batches to its own input (see the module docstring)."""
    model.register_forward_pre_hook(ConvertInput(*specs))
    model.input_spec = specs[1]
    return model


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """A 1-channel statistic repeated over `channels` (the data's gray image seen as RGB)."""
    values = tuple(values)
    return values * channels if len(values) == 1 and channels > 1 else values


def _floats(values: Any, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise KdlabError(
            f"{key}={values!r} must be a list of numbers, one per channel, e.g. {key}=[0.5]."
        ) from None


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-9 for x, y in zip(a, b, strict=True))
