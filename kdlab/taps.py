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


class FeatureTap:
    """Calls `model` and collects the outputs of the submodules named in `layers`."""

    def __init__(self, model: nn.Module, layers: Iterable[str] = (), role: str = "model"):
        self.model = model
        self.layers = tuple(dict.fromkeys(layers))  # de-duplicated, order kept
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if name not in modules or not name]
        if unknown:
            raise KdlabError(unknown_layer_message(model, unknown, role))
        self._feats: dict[str, Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(partial(self._store, name)) for name in self.layers
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
    natural = getattr(model, "tap_points", ())
    shown = ", ".join(paths[:80]) + (f", ... ({len(paths) - 80} more)" if len(paths) > 80 else "")
    hint = f" Its natural tap points are: {', '.join(natural)}." if natural else ""
    return (
        f"The {role} ({type(model).__name__}) has no module named {', '.join(map(repr, unknown))}, so its "
        f"features cannot be tapped.{hint} Pick layers from its module paths: {shown}."
    )
