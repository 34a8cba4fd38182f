"""Named intermediate features from any model, read with forward hooks by module path.

A `FeatureTap` wraps an unmodified model (kdlab's own, torchvision's, anyone's) and returns
`Outputs(logits, feats)`, where `feats` holds the outputs of exactly the submodules that
the knowledge losses asked for. Hooks are registered once, before any `torch.compile`,
and cost nothing for layers nobody asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from kdlab.errors import KdlabError


@dataclass
class Outputs:
    """What a model hands to the knowledge losses: its logits and the tapped features."""

    logits: Tensor
    feats: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> Outputs:
        return Outputs(self.logits.detach(), {k: v.detach() for k, v in self.feats.items()})


def module_paths(model: nn.Module) -> list[str]:
    """Every addressable submodule path of `model` (the names `layers:` may use)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> str:
    """A layer name as a module path: a model's named tap point (e.g. "stage2") or a path."""
    return getattr(model, "tap_points", {}).get(name, name)


def expand_layers(model: nn.Module, names: Iterable[str], role: str = "model") -> list[str]:
    """Expand the group names a loss config may use into the model's own tap points.

    "stages" is every stage output in order (stage1..stageN) and "last_stage" the deepest,
    so one config (e.g. attention transfer on all stages) fits models of any depth.
    """
    stages = sorted(
        (alias for alias in getattr(model, "tap_points", {}) if alias.startswith("stage")),
        key=lambda alias: int(alias[len("stage") :]),
    )
    expanded: list[str] = []
    for name in names:
        if name in ("stages", "last_stage"):
            if not stages:
                raise KdlabError(
                    f"The {role} ({type(model).__name__}) has no named stages, so '{name}' means nothing "
                    f"for it. Name its layers by module path instead, e.g. "
                    f"knowledge.<name>.{role}_layers=[{', '.join(module_paths(model)[:3])}]."
                )
            expanded += stages if name == "stages" else stages[-1:]
        else:
            expanded.append(name)
    return expanded


class FeatureTap:
    """Calls `model` and collects the outputs of the submodules named in `layers`.

    A name may be a module path ("layer2.0.conv1") or one of the model's named tap points
    ("stage2", "embedding"); `Outputs.feats` is keyed by the name as it was asked for.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] = (), role: str = "model"):
        self.model = model
        self.layers = tuple(dict.fromkeys(layers))  # de-duplicated, order kept
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if resolve_layer(model, name) not in modules or not name]
        if unknown:
            raise KdlabError(unknown_layer_message(model, unknown, role))
        self._feats: dict[str, Tensor] = {}
        self._handles = [
            modules[resolve_layer(model, name)].register_forward_hook(partial(self._store, name))
            for name in self.layers
        ]

    def _store(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._feats[name] = output

    def __call__(self, x: Tensor) -> Outputs:
        self._feats = {}
        logits = self.model(x)
        feats, self._feats = self._feats, {}
        return Outputs(logits, feats)

    def remove(self) -> None:
        """Detach the hooks, leaving the model exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def unknown_layer_message(model: nn.Module, unknown: list[str], role: str) -> str:
    paths = module_paths(model)
    natural = [f"{alias} ({path})" for alias, path in getattr(model, "tap_points", {}).items()]
    shown = ", ".join(paths[:80]) + (f", ... ({len(paths) - 80} more)" if len(paths) > 80 else "")
    hint = f" Its named tap points are: {', '.join(natural)}." if natural else ""
    return (
        f"The {role} ({type(model).__name__}) has no module named {', '.join(map(repr, unknown))}, so its "
        f"features cannot be tapped.{hint} Pick layers from its module paths: {shown}."
    )
