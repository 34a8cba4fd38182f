"""timm models by name: `model@teacher=timm/<name>` and `model@student=timm/<name>`.

Any model of timm (https://huggingface.co/docs/timm) is built by `timm.create_model` with the
data's class count and input channels. Its tap points (`stage1..N`, and through them `stages` and
`last_stage`) are timm's own feature metadata (`model.feature_info`, the modules timm's
`features_only` mode returns), and `embedding` is what its classifier is given (the pooled
pre-logits features). A ViT's stages are its blocks, whose outputs are tokens `[B, N, C]`.

The input size. Convolutional models take any size, so the data's images go in as they are. A model
whose pretrained config says its input size is fixed (ViTs, DeiT, Swin, ...: timm's
`fixed_input_size`) is built for the data's size (`img_size=input_size`): its patch grid and position
embeddings are made for that size (timm resamples pretrained position embeddings to it). After
building, one forward pass of a blank image at the data's size checks that the model can take it
(e.g. a ConvNeXt downsamples by 32 and cannot take 28 px images), and an error says so before any
training starts.

Weights. `pretrained: false` (the default) builds with random weights and never touches the
network. `pretrained: true` asks timm to download them; `pretrained_file: PATH` loads a local file
instead (timm's `pretrained_cfg_overlay`), for machines without network access.

The config group has one file, conf/model/timm.yaml; `timm/<name>` on the command line (or in a
compose call) is registered for Hydra by `register_choices`, which kdlab/cli.py calls before Hydra
composes, so sweeps such as `model@student=timm/resnet10t,timm/vit_tiny_patch16_224` work.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

import torch
from torch import nn

from kdlab.errors import KdlabError

TIMM_PREFIX = "timm/"
GROUP = "model"
# `model@teacher=timm/<name>[,timm/<name>...]` or `model=...`: the choice of a model config group.
_CHOICE = re.compile(r"^[~+]*model(@[\w.]+)?=(?P<value>.*)$")


def register_choices(overrides: Iterable[str]) -> None:
    """Store a Hydra config `model/timm/<name>` for each `timm/<name>` chosen in `overrides`, so the
    group option exists when Hydra composes (the group has no file per timm model)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for line in overrides:
        match = _CHOICE.match(line.strip())
        if not match:
            continue
        value = match.group("value")
        for choice in re.sub(r"^(choice|range)\((.*)\)$", r"\2", value).split(","):
            choice = choice.strip().strip("'\"")
            if choice.startswith(TIMM_PREFIX) and len(choice) > len(TIMM_PREFIX):
                name = choice[len(TIMM_PREFIX) :]
                store.store(
                    group=f"{GROUP}/timm",
                    name=name,
                    node={
                        "_target_": "kdlab.models.create_model",
                        "name": choice,
                        "pretrained": False,
                        "pretrained_file": None,
                    },
                    provider="kdlab",
                )


def create_timm(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs,
) -> nn.Module:
    """timm model `name` for the data (classes, channels, input size), with kdlab's tap points."""
    try:
        import timm
    except ImportError as error:  # a dependency, but a broken environment deserves a clear message
        raise KdlabError(
            f"timm/{name} needs the timm package, which is not installed. Install it with "
            "`pip install timm` (kdlab lists it as a dependency), then rerun."
        ) from error
    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Similar names: {', '.join(f'timm/{s}' for s in similar)}." if similar else ""
        raise KdlabError(
            f"'timm/{name}' is not a timm model.{hint} `python -c \"import timm; "
            "print(timm.list_models('*vit*'))\"` lists the names; choose one as model@teacher=timm/<name> "
            "or model@student=timm/<name>."
        )
    options = dict(kwargs)
    if _fixed_input_size(timm, name) and "img_size" not in options:
        options["img_size"] = input_size
    if pretrained_file is not None:
        pretrained, options["pretrained_cfg_overlay"] = True, {"file": str(pretrained_file)}
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **options
        )
    except TypeError as error:
        raise KdlabError(
            f"timm could not build 'timm/{name}' with the options {sorted(options)}: {error}. Remove the "
            "option from the model config, or check the names timm's constructor for this model takes."
        ) from error
    except Exception as error:
        if not pretrained:
            raise
        source = f"the file {pretrained_file}" if pretrained_file else "the network (Hugging Face Hub)"
        raise KdlabError(
            f"timm/{name} with pretrained=true: loading its weights from {source} failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). A run downloads "
            "nothing unless asked to. Without network access, download the weights on another machine "
            "and set pretrained_file=/path/to/weights (e.g. teacher.pretrained_file=...), or set "
            "pretrained=false to train from random weights."
        ) from error
    _check_input_size(model, name, in_channels, input_size)
    model.tap_points = tap_points(model)
    return model


def _fixed_input_size(timm, name: str) -> bool:
    config = timm.models.get_pretrained_cfg(name)
    return bool(getattr(config, "fixed_input_size", False)) if config is not None else False


def tap_points(model: nn.Module) -> dict[str, str]:
    """stage1..N from timm's feature metadata, in order, and `embedding`: the classifier's input."""
    points = {}
    info = getattr(model, "feature_info", None) or []
    for i, entry in enumerate(info, start=1):
        module = entry["module"] if isinstance(entry, dict) else None
        if module:
            points[f"stage{i}"] = module
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    paths = [path for path, module in model.named_modules() if module is classifier and path]
    if paths and isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
        points["embedding"] = f"{paths[0]}:input"
    # DeiT's distilled ViTs: a class token and a distillation token, each with its own head, whose
    # logits the model averages (knowledge=deit trains them apart; the report shows each).
    if isinstance(getattr(model, "head_dist", None), nn.Linear) and isinstance(model.head, nn.Linear):
        points.update({"class_head": "head", "distillation_head": "head_dist", "embedding": "head:input"})
    return points


def _check_input_size(model: nn.Module, name: str, in_channels: int, input_size: int) -> None:
    """One forward pass of a blank image: an architecture that cannot take the data's size says so now."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError as error:
        raise KdlabError(
            f"timm/{name} cannot take the data's {input_size}x{input_size} images: "
            f"{str(error).splitlines()[0]}. Its downsampling needs larger inputs. Choose a model that "
            "downsamples less (e.g. a CIFAR-style kdlab model, or a timm ResNet), or data with larger "
            "images (data=imagefolder with data.input_size=224)."
        ) from error
    finally:
        model.train(was_training)
