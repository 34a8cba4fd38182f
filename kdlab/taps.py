"""Named intermediate features from any model, read with forward hooks by module path.

A `FeatureTap` wraps an unmodified model (kdlab's own, torchvision's, anyone's) and returns
`Outputs(logits, feats)`, where `feats` holds the outputs of exactly the submodules that
the knowledge losses asked for. Hooks are registered once, before any `torch.compile`,
and cost nothing for layers nobody asked for.

A path ending in ":input" taps what a module is given rather than what it returns. Models use
it for their pre-activation tap points ("stage2_preact": the input of the stage's last ReLU,
which OFD and ReviewKD read): where a ReLU is called more than once per block (torchvision's
blocks reuse one), the last call's input is kept, which is the sum before the block's final
activation. An in-place ReLU would overwrite what it is given, so that input is cloned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from kdlab.errors import KdlabError

INPUT_SUFFIX = ":input"


@dataclass
class Outputs:
    """What a model hands to the knowledge losses.

    Attributes:
        logits: the model's logits for the batch's main input.
        feats: the tapped features, by the names the losses asked for.
        views: the same outputs for each extra view of the batch a loss declared (e.g. "strong"),
            computed by the scheme (see `Knowledge.views`).
        model: the live model these outputs came from, for losses that use its parts (its
            classifier, its BatchNorm statistics: see kdlab.heads), or None where there is no
            such model (an ensemble, a bank of past predictions). It is the real module, never
            a copy; kdlab.heads reads it without letting a gradient reach it.
    """

    logits: Tensor
    feats: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, Outputs] = field(default_factory=dict)
    model: nn.Module | None = None

    def detach(self) -> Outputs:
        return Outputs(
            self.logits.detach(),
            {k: v.detach() for k, v in self.feats.items()},
            {k: v.detach() for k, v in self.views.items()},
            self.model,
        )


def module_paths(model: nn.Module) -> list[str]:
    """Every addressable submodule path of `model` (the names `layers:` may use)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> str:
    """A layer name as a module path: a model's named tap point (e.g. "stage2") or a path.

    The path may end in ":input" (the module's input is tapped, not its output), and so may a tap
    point's name: "embedding:input" is what the pooling layer is given, the last feature map.
    """
    points = getattr(model, "tap_points", {})
    if name in points:
        return points[name]
    base, takes_input = split_input_suffix(name)
    if takes_input and base in points and not points[base].endswith(INPUT_SUFFIX):
        return points[base] + INPUT_SUFFIX
    return name


def split_input_suffix(path: str) -> tuple[str, bool]:
    """("layer1.2.relu", True) for "layer1.2.relu:input"; (path, False) otherwise."""
    if path.endswith(INPUT_SUFFIX):
        return path[: -len(INPUT_SUFFIX)], True
    return path, False


def stage_aliases(model: nn.Module, suffix: str = "") -> list[str]:
    """The model's stage tap points (stage1..stageN, or stage1_preact.. with `suffix`), by depth."""
    pattern = re.compile(rf"stage(\d+){re.escape(suffix)}")
    found = [
        (int(m.group(1)), alias)
        for alias in getattr(model, "tap_points", {})
        if (m := pattern.fullmatch(alias))
    ]
    return [alias for _, alias in sorted(found)]


# Group names a loss config may use, and the suffix of the tap points each one expands to.
GROUPS = {
    "stages": "",
    "last_stage": "",
    "stages_preact": "_preact",
    "last_stage_preact": "_preact",
    # what each block's self-attention reads (a language model's; kdlab.models.hf_lm)
    "stages_attention_input": "_attention_input",
    "last_stage_attention_input": "_attention_input",
}


def expand_layers(model: nn.Module, names: Iterable[str], role: str = "model") -> list[str]:
    """Expand the group names a loss config may use into the model's own tap points.

    "stages" is every stage output in order (stage1..stageN) and "last_stage" the deepest, so one
    config (e.g. attention transfer on all stages) fits models of any depth; "stages_preact" and
    "last_stage_preact" are the same before each stage's final ReLU (kdlab.models.preact);
    "stages_attention_input" and "last_stage_attention_input" what each block's self-attention reads.
    """
    expanded: list[str] = []
    for name in names:
        if name in GROUPS:
            stages = stage_aliases(model, GROUPS[name])
            if not stages:
                kinds = {"": "named stages", "_preact": "pre-activation stage taps"}
                kind = kinds.get(GROUPS[name], "self-attention inputs")
                raise KdlabError(
                    f"The {role} ({type(model).__name__}) has no {kind}, so '{name}' means nothing "
                    f"for it. Name its layers by module path instead, e.g. "
                    f"knowledge.<name>.{role}_layers=[{', '.join(module_paths(model)[:3])}]."
                )
            expanded += stages if name.startswith("stages") else stages[-1:]
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
        paths = {name: split_input_suffix(resolve_layer(model, name)) for name in self.layers}
        unknown = [name for name in self.layers if paths[name][0] not in modules or not name]
        if unknown:
            raise KdlabError(unknown_layer_message(model, unknown, role))
        self._feats: dict[str, Tensor] = {}
        self._handles = []
        for name, (path, takes_input) in paths.items():
            module = modules[path]
            if takes_input:
                hook = partial(self._store_input, name, bool(getattr(module, "inplace", False)))
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                self._handles.append(module.register_forward_hook(partial(self._store, name)))

    def _store(self, name: str, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        # A block that returns (hidden states, attention weights, ...), as some transformers layers do.
        self._feats[name] = output[0] if isinstance(output, tuple) else output

    def _store_input(self, name: str, inplace: bool, module: nn.Module, args: tuple) -> None:
        self._feats[name] = args[0].clone() if inplace else args[0]

    def __call__(self, x: Tensor) -> Outputs:
        self._feats = {}
        logits = self.model(x)
        feats, self._feats = self._feats, {}
        return Outputs(logits, feats, model=self.model)

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
