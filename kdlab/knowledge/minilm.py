"""MiniLM's self-attention relation distillation (`knowledge=minilm`): relation knowledge for language models.

Wang et al. 2020 (MiniLM, NeurIPS, Sec. 3.1) and 2021 (MiniLMv2, Findings of ACL, Eq. 3-5): at one
block of each model, the student mimics the teacher's query-query, key-key and value-value relations,
softmax(X_r X_rᵀ / √d_r) over shared relation heads (kdlab.knowledge.attention_relations), so widths and
head counts may differ. The loss is the mean over the configured relations of KL(R_teacher || R_student).
MiniLMv2 distils one block: the teacher's last (base models) or an upper-middle one (large models),
into the student's last; here `student_layers` and `teacher_layers` name the blocks (default: the last of
each), and several pairs add up.

The queries, keys and values are computed from what each block's self-attention reads (the tap point
`<block>_attention_input`) with that block's own projections (`CausalLM.query_key_value`): so the
student's gradient reaches its own attention weights, and the teacher's side is detached. Only the
counted positions (the batch's `positions`) enter the relations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.attention_relations import relation_kl
from kdlab.knowledge.base import Knowledge, LossContext
from kdlab.knowledge.pairs import layer_list
from kdlab.taps import Outputs

RELATIONS = ("query", "key", "value")
SUFFIX = "_attention_input"


class MiniLM(Knowledge):
    """Self-attention relation distillation (see the module docstring)."""

    key = "minilm"

    def __init__(
        self,
        relations: Sequence[str] = RELATIONS,
        relation_heads: int | None = None,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("last_stage_attention_input",),
        teacher_layers: str | Sequence[str] = ("last_stage_attention_input",),
        name: str | None = None,
    ):
        super().__init__(
            weight, task_weight, layer_list(student_layers), layer_list(teacher_layers), name=name
        )
        unknown = [r for r in relations if r not in RELATIONS]
        if unknown or not relations:
            raise KdlabError(
                f"knowledge.{self.name}.relations={list(relations)}: each must be one of "
                f"{', '.join(RELATIONS)} (MiniLMv2 uses all three; MiniLM v1's value relation is [value])."
            )
        if relation_heads is not None and (isinstance(relation_heads, bool) or int(relation_heads) < 1):
            raise KdlabError(
                f"knowledge.{self.name}.relation_heads={relation_heads!r} must be a whole number >= 1, or "
                "null for the largest count that divides both models' widths."
            )
        self.relations = tuple(relations)
        self.relation_heads = relation_heads

    def check_model(self, model: nn.Module, side: str, role: str) -> None:
        if not hasattr(model, "query_key_value"):
            raise KdlabError(
                f"knowledge.{self.name} (MiniLM) reads the self-attention of a language model, but the "
                f"{role} is a {type(model).__name__}. Use it with task=lm and transformers causal LMs "
                "(mode=offline, online or on_policy); for images, relation knowledge is "
                "knowledge=relation (RKD) or sp, cc, pkt."
            )

    def _projections(self, outputs: Outputs, layer: str, side: str) -> tuple[Tensor, Tensor, Tensor]:
        if layer not in outputs.feats or not layer.endswith(SUFFIX):
            raise KdlabError(
                f"knowledge.{self.name} reads the {side}'s self-attention inputs, tap points "
                f"<block>{SUFFIX}, but its layer is {layer!r}. Set knowledge.{self.name}.{side}_layers to "
                f"such tap points, e.g. [last_stage{SUFFIX}] or [stage2{SUFFIX}]."
            )
        return outputs.model.query_key_value(layer.removesuffix(SUFFIX), outputs.feats[layer])

    def heads(self, student_width: int, teacher_width: int) -> int:
        """The relation heads: as set, else the greatest common divisor of the widths capped at 12 (the
        paper's count for base models), a count that splits both."""
        if self.relation_heads is not None:
            return int(self.relation_heads)
        common = math.gcd(student_width, teacher_width)
        return max(h for h in range(1, min(common, 12) + 1) if common % h == 0)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        if len(self.student_layers) != len(self.teacher_layers):
            raise KdlabError(
                f"knowledge.{self.name} pairs student_layers[i] with teacher_layers[i], but there are "
                f"{len(self.student_layers)} and {len(self.teacher_layers)}: list as many blocks on each "
                "side."
            )
        counted = batch.get("positions")
        total = student.logits.new_zeros(())
        for s_layer, t_layer in zip(self.student_layers, self.teacher_layers, strict=True):
            s_qkv = self._projections(student, s_layer, "student")
            with torch.no_grad():
                t_qkv = self._projections(source, t_layer, "teacher")
            for relation in self.relations:
                index = RELATIONS.index(relation)
                s, t = s_qkv[index], t_qkv[index].detach()
                heads = self.heads(s.shape[-1], t.shape[-1])
                total = total + relation_kl(s, t, heads, counted) / len(self.relations)
        return total
