"""The interface every kind of knowledge implements, in every scheme.

A `Knowledge` is an `nn.Module` loss: it compares the student's `Outputs` with a source's
`Outputs` (a frozen teacher, a detached peer, a deeper exit, past predictions) and may
read the batch (e.g. the sample index). It owns any learnable adapter it needs; adapters
are created by `build()` from the real shapes of one dry forward pass, so they are
optimised with the student and saved in its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.taps import Outputs


def checked_number(
    value: object,
    key: str,
    name: str,
    example: object,
    minimum: float = 0.0,
    strict: bool = True,
    why: str = "",
) -> float:
    """`value` as a float if it is a finite number above `minimum` (at least it, if not `strict`).

    Otherwise a KdlabError naming the config key `knowledge.<key>.<name>` and an example value.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        reason = f" ({why})" if why else ""
        raise KdlabError(
            f"knowledge.{key}.{name}={value!r}: {name} must be a finite number {bound}{reason}. "
            f"Set it to such a number, e.g. knowledge.{key}.{name}={example}."
        )
    return float(value)


class Knowledge(nn.Module):
    """One transferable kind of knowledge, weighted in the scheme's loss sum.

    Args:
        weight: this term's weight in the total loss.
        task_weight: the weight the method's published recipe gives the task (cross-entropy)
            loss. A scheme uses it when `mode.task_weight` is null and this is the only term.
        student_layers / teacher_layers: the layers whose features this loss reads: named tap
            points of the model ("stage2", "embedding") or module paths. "Teacher" is the
            teaching side of any scheme: a frozen teacher, a peer, a deeper exit.
    """

    def __init__(
        self,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: tuple[str, ...] | list[str] = (),
        teacher_layers: tuple[str, ...] | list[str] = (),
    ):
        super().__init__()
        key = type(self).__name__.lower()
        self.weight = checked_number(weight, key, "weight", 1, strict=False)
        self.task_weight = checked_number(task_weight, key, "task_weight", 1, strict=False)
        self.student_layers = tuple(student_layers)
        self.teacher_layers = tuple(teacher_layers)
        # Set by the scheme: the training split's index count (for per-sample state, e.g. memory
        # banks) before build(), and the current epoch (for schedules such as warm-up) each epoch.
        self.num_samples: int | None = None
        self.epoch = 0

    def build(self, student: Outputs, source: Outputs) -> None:
        """Create adapters from real output shapes; called once before training."""

    def forward(self, student: Outputs, source: Outputs, batch: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError
