"""The interface every kind of knowledge implements, in every scheme.

A `Knowledge` is an `nn.Module` loss: it compares the student's `Outputs` with a source's
`Outputs` (a frozen teacher, a detached peer, a deeper exit, past predictions) and may
read the batch (e.g. the sample index). It owns any learnable adapter it needs; adapters
are created by `build()` from the real shapes of one dry forward pass, so they are
optimised with the student and saved in its checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


def checked_epochs(value: object, key: str, name: str = "init_epochs", example: int = 30) -> int:
    """`value` if it is a whole number of epochs >= 1, else a KdlabError naming `knowledge.<key>.<name>`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KdlabError(
            f"knowledge.{key}.{name}={value!r}: the stage before the main fit runs a whole number of epochs, "
            f"at least 1. Set it to such a number, e.g. knowledge.{key}.{name}={example} (the recipe's)."
        )
    return value


def linear_warmup(context: LossContext | None, epochs: int, key: str, method: str) -> float:
    """min(epoch / epochs, 1), counting epochs from 1 as mdistiller does (DKD, ReviewKD, SDD); 1 for 0.

    A loss used outside a scheme must be given the run's epoch in `context`; without it, a clear
    error naming `knowledge.<key>.warmup_epochs`.
    """
    if epochs <= 0:
        return 1.0
    if context is None:
        raise KdlabError(
            f"knowledge.{key} ({method}) ramps its loss up over the first {epochs} epochs, so it needs the "
            "run's epoch, but forward() got no context. Pass context=LossContext(epoch=<current epoch>, "
            f"...), or set knowledge.{key}.warmup_epochs=0 for no warm-up."
        )
    return min((context.epoch + 1) / epochs, 1.0)


@dataclass(frozen=True)
class Stage:
    """A fit a loss needs before the main one (e.g. AB's initialisation, FT's paraphraser).

    The entry point runs each declared stage in order, before the main fit, on the same data and
    teacher (kdlab.stages): the loss's `stage_loss` is minimised alone, over the parameters of
    `stage_modules` and, with `trains_student`, the student's (its classifier excepted). Each
    stage's result is kept in the run directory, so a resumed run does not repeat it.

    Attributes:
        name: the stage's name in messages, the results and the run directory (e.g. "init").
        epochs: how many epochs it runs (trainer.limit_train_batches applies, as in the main fit).
        trains_student: whether the student's layers are trained too.
        lr: its learning rate (None: the run's optimizer.lr); the rest of the optimizer is the run's.
    """

    name: str
    epochs: int
    trains_student: bool = False
    lr: float | None = None


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to know about the run it is in, handed to `build` and `forward`.

    The scheme makes one per step; a loss used on its own is given one by its caller. Losses
    with a schedule (e.g. DKD's warm-up) read the epoch here, and losses with per-sample state
    (e.g. CRD's memory banks) the size of the training split.

    Attributes:
        num_samples: the training split's index count (batch["index"] runs over 0..num_samples-1).
        epoch: the current training epoch, from 0.
        max_epochs: the epochs the run plans (None: unbounded).
        step: the optimizer steps taken so far.
    """

    num_samples: int | None = None
    epoch: int = 0
    max_epochs: int | None = None
    step: int = 0


class Knowledge(nn.Module):
    """One transferable kind of knowledge, weighted in the scheme's loss sum.

    Args:
        weight: this term's weight in the total loss.
        task_weight: the weight the method's published recipe gives the task (cross-entropy)
            loss. A scheme uses it when `mode.task_weight` is null and this is the only term.
        student_layers / teacher_layers: the layers whose features this loss reads: named tap
            points of the model ("stage2", "embedding") or module paths. "Teacher" is the
            teaching side of any scheme: a frozen teacher, a peer, a deeper exit.
        name: the name the loss was configured under (`knowledge.<name>`), used in messages and
            logged metric names; kdlab's config builder passes it. Defaults to the class's `key`.
    """

    #: the config name of this loss when it is not given one (conf/knowledge/<key>.yaml)
    key: str | None = None
    #: the extra views of each training sample this loss reads (e.g. ("strong",)): the data then
    #: carries them, and the scheme runs the student and the source on each, into `Outputs.views`
    views: tuple[str, ...] = ()

    def __init__(
        self,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: tuple[str, ...] | list[str] = (),
        teacher_layers: tuple[str, ...] | list[str] = (),
        name: str | None = None,
    ):
        super().__init__()
        self.name = name or self.key or type(self).__name__.lower()
        self.weight = checked_number(weight, self.name, "weight", 1, strict=False)
        self.task_weight = checked_number(task_weight, self.name, "task_weight", 1, strict=False)
        self.student_layers = tuple(student_layers)
        self.teacher_layers = tuple(teacher_layers)

    def with_layers(self, student_layers: Iterable[str], teacher_layers: Iterable[str]) -> Knowledge:
        """A copy of this loss that reads these layers: the scheme's expansion of the configured ones
        ("stages" -> stage1..stageN of each model). The configured loss itself is left as it is."""
        bound = copy.deepcopy(self)
        bound.student_layers, bound.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        return bound

    def check_model(self, model: nn.Module, side: str, role: str) -> None:
        """Raise a KdlabError that says what to use when `model` cannot be this loss's `side` ("student"
        or "teacher"; `role` is its name in the run), before its layers are tapped. Most losses read
        what any model has, and check nothing."""

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        """Create adapters from real output shapes; called once before training."""

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        """The unweighted loss for one batch. `context` is the run's state (see LossContext)."""
        raise NotImplementedError

    # ------------------------------------------------------------- what is deployed
    def deployed_student(self, student: nn.Module, source: Outputs) -> nn.Module | None:
        """The model to evaluate, report and save in the student's place, if this loss changes it.

        None for almost every loss. SimKD returns student + projector + the teacher's classifier.
        Called once after `build`, with the trained student and the source's outputs.
        """
        return None

    def deployed_description(self) -> str:
        """What the deployed student adds to the student's architecture, for the results table."""
        return ""

    # ----------------------------------------------------------- stages before the main fit
    def stages(self) -> list[Stage]:
        """The stages this loss runs before the main fit, in order (none by default)."""
        return []

    def stage_modules(self, stage: str) -> list[nn.Module]:
        """This loss's modules that stage `stage` trains (all of its adapters by default)."""
        return [self]

    def stage_only_modules(self) -> list[nn.Module]:
        """This loss's modules that only its stages train (AB's connectors, FT's paraphraser).

        The main fit keeps them fixed: not in its optimizer, no gradient, BatchNorm on its running
        statistics (kdlab.schemes.base.Scheme freezes them when the main fit is set up).
        """
        return []

    def stage_loss(
        self,
        stage: str,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        """The loss stage `stage` minimises, alone (no task loss)."""
        raise NotImplementedError(f"{type(self).__name__} declares stage {stage!r} but no stage_loss for it")


def views_of(terms: Iterable[Knowledge]) -> list[str]:
    """Every extra view the terms read, in a stable order."""
    return sorted({view for term in terms for view in getattr(term, "views", ())})
