"""The shared base of losses that compare `student_layers[i]` with `teacher_layers[i]`.

Feature-based losses (FitNets, AT, NST, VID, cosine) and relation-based ones (RKD, SP, PKT, CC,
FSP) all read pairs of layers and combine one loss per pair. This base does that once: it
checks the layer lists, pairs the features after the scheme expanded "stages"/"last_stage" for
each model, detaches the source side, and sums (or averages) the per-pair losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext
from kdlab.knowledge.layouts import feature_map
from kdlab.taps import Outputs

LAYER_REDUCTIONS = ("sum", "mean")


def layer_list(layers: str | Sequence[str]) -> tuple[str, ...]:
    """A single name from the command line (`...student_layers=stage3`) is a list of one."""
    return (layers,) if isinstance(layers, str) else tuple(layers)


class LayerPairKnowledge(Knowledge):
    """Pairs layers and combines `pair_loss` over the pairs.

    Subclasses set `key` (the config name used in messages) and implement `pair_loss`.
    Per-pair losses are summed by default, as the papers (e.g. AT Eq. 2) and the CRD benchmark
    code (`sum(loss_group)`) do, so the benchmark weights apply unchanged; `layer_reduction:
    mean` averages them instead.
    """

    key = "knowledge"

    def __init__(
        self,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages",),
        teacher_layers: str | Sequence[str] = ("stages",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(
            weight, task_weight, layer_list(student_layers), layer_list(teacher_layers), name=name
        )
        if not self.student_layers or not self.teacher_layers:
            raise KdlabError(
                f"{type(self).__name__} reads no layers (student_layers={list(self.student_layers)}, "
                f"teacher_layers={list(self.teacher_layers)}). Set knowledge.{self.name}.student_layers and "
                f"knowledge.{self.name}.teacher_layers to the layers to compare, e.g. [stages] (every "
                "stage), [last_stage] or [embedding], or to module paths of the two models."
            )
        if layer_reduction not in LAYER_REDUCTIONS:
            raise KdlabError(
                f"{type(self).__name__}: layer_reduction={layer_reduction!r} is not one of "
                f"{', '.join(LAYER_REDUCTIONS)}. Set knowledge.{self.name}.layer_reduction to 'sum' (the "
                "papers and the CRD benchmark: the per-layer losses are added) or 'mean'."
            )
        self.layer_reduction = layer_reduction

    def pairs(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        """(student feature, source feature) per pair; the source side is detached."""
        s_names, t_names = list(self.student_layers), list(self.teacher_layers)
        if len(s_names) != len(t_names):
            n = min(len(s_names), len(t_names))
            raise KdlabError(
                f"{type(self).__name__} compares student_layers[i] with teacher_layers[i], but after "
                f"'stages'/'last_stage' were expanded for each model the student has {len(s_names)} layer(s) "
                f"{s_names} and the teacher {len(t_names)} {t_names}. Give "
                f"knowledge.{self.name}.student_layers and knowledge.{self.name}.teacher_layers the same "
                f"number of layers, e.g. the deepest {n} of each: "
                f"knowledge.{self.name}.student_layers=[{','.join(s_names[-n:])}] "
                f"knowledge.{self.name}.teacher_layers=[{','.join(t_names[-n:])}]."
            )
        pairs = []
        for s_name, t_name in zip(s_names, t_names, strict=True):
            s = self._feature(student, s_name, "student")
            # Detached here too, not only by the scheme: no loss may train its source.
            t = self._feature(source, t_name, "teacher").detach()
            # A ViT's tokens as the map of their patch grid, an LM's hidden states as a column of positions,
            # so any pair of families compares maps.
            s = feature_map(s, student.model, f"The student's '{s_name}'")
            t = feature_map(t, source.model, f"The teacher's '{t_name}'")
            if s.shape[0] != t.shape[0]:
                raise KdlabError(
                    f"{type(self).__name__} compares the samples of one batch, but the student's '{s_name}' "
                    f"holds {s.shape[0]} samples and the teacher's '{t_name}' {t.shape[0]}. Check that "
                    f"knowledge.{self.name}.student_layers/teacher_layers name per-sample features."
                )
            pairs.append((s, t))
        return pairs

    def _feature(self, outputs: Outputs, name: str, side: str) -> Tensor:
        if name not in outputs.feats:
            raise KdlabError(
                f"{type(self).__name__} reads the {side}'s feature '{name}', but the {side}'s outputs carry "
                f"only {sorted(outputs.feats)}. Build the loss inside a scheme, which taps the layers named "
                f"in knowledge.{self.name}.{side}_layers, or check that list names a tap point or module "
                "path."
            )
        return outputs.feats[name]

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        self.pairs(student, source)  # fail before training, with the message, not at step one

    def check_one_layer(self, what: str, example: str, count: int | None = None) -> None:
        """Raise the clear error of a loss that reads exactly one layer of each model (SRD, SDD, FT).

        `what` says why (e.g. "distils the representation the teacher's classifier reads"); `count`
        is the number of pairs after the scheme expanded group names (None: the configured lists).
        """
        pairs = count if count is not None else max(len(self.student_layers), len(self.teacher_layers))
        if pairs == 1 and len(self.student_layers) == len(self.teacher_layers) == 1:
            return
        raise KdlabError(
            f"knowledge.{self.name} ({type(self).__name__}) {what}, so it reads one layer of each model, but "
            f"student_layers={list(self.student_layers)} and teacher_layers={list(self.teacher_layers)} give "
            f"{pairs} pairs. Set both to one layer, e.g. knowledge.{self.name}.student_layers=[{example}] "
            f"knowledge.{self.name}.teacher_layers=[{example}]."
        )

    def one_pair(self, student: Outputs, source: Outputs, what: str, example: str) -> tuple[Tensor, Tensor]:
        """The single (student, detached source) pair of a loss that reads one layer of each model."""
        pairs = self.pairs(student, source)
        self.check_one_layer(what, example, len(pairs))
        return pairs[0]

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        losses = torch.stack(
            [self.pair_loss(i, s, t) for i, (s, t) in enumerate(self.pairs(student, source))]
        )
        return losses.sum() if self.layer_reduction == "sum" else losses.mean()
