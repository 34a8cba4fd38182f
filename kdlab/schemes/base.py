"""What every scheme shares: knowledge losses, the weighted loss sum, optimisation, metrics.

A scheme is a LightningModule that decides *where* knowledge comes from; subclasses hold the
trained models (one student, N peers, a model with exits) and say what teaches what. Each scheme
class also obtains its own sources before it is built (`sources_for`: a frozen teacher from the
teacher store, fresh peers, or nothing), so the entry point never asks which kind it is. This
base owns the rest: the configured knowledge terms and the run context they are given, the task
weight, the optimizer over the trained models and the loss adapters only, the task's torchmetrics
for every reported model (kdlab.tasks: top-1/top-5 as fractions of samples, or per token for a
language model, with perplexity), and a check that stops a run whose loss became NaN or infinite
with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdlab.distributed import world_size
from kdlab.errors import KdlabError
from kdlab.heads import classifier_of
from kdlab.knowledge import Knowledge, LossContext
from kdlab.optim import DOT
from kdlab.taps import FeatureTap, Outputs
from kdlab.tasks import IGNORE_INDEX, ImageClassification, Task

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

# What the wrong-task error suggests (each scheme's `tasks` is what decides).
SCHEMES_OF_TASK = {
    "image": "offline, online, self (byot), pskd, born_again, cskd, tfkd, baseline",
    "lm": "offline, online, self (byot), on_policy, seqkd, born_again, baseline",
}
# Tap points of a model that averages several heads' logits (timm's distilled DeiTs): each is tested too.
SEPARATE_HEADS = ("class_head", "distillation_head")


class TeacherProvider(Protocol):
    """Where a scheme gets frozen teachers from: kdlab.teachers.TeacherStore (which trains missing
    ones with a scheme, so the schemes only know this interface, not the store)."""

    def frozen_teacher(self, cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[nn.Module, Any]:
        """The frozen teacher of offline distillation and its record (where it came from)."""

    def generations(
        self, cfg: DictConfig, datamodule: L.LightningDataModule, count: int
    ) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        """Born-Again's generations 0..count-1: the last, the earlier ones by name, the last's record."""


@dataclass
class Sources:
    """What a scheme learns from, obtained before the scheme is built (`Scheme.sources_for`).

    Attributes:
        modules: keyword arguments for the scheme's constructor (e.g. `teacher=`, `earlier=`).
        architectures: results-table name -> architecture name, for the models the sources add.
        frozen: the record (kdlab.teachers.TeacherRecord) of the frozen teacher the knowledge comes
            from, or None;
            its outputs may be served from the teacher-output cache.
        frozen_config: the frozen teacher's model config (its architecture, for the cache's key).
    """

    modules: dict[str, Any] = field(default_factory=dict)
    architectures: dict[str, str] = field(default_factory=dict)
    frozen: Any = None
    frozen_config: DictConfig | None = None


def checked_knowledge(knowledge: Mapping[str, nn.Module] | None) -> dict[str, Knowledge]:
    terms = dict(knowledge or {})
    for name, term in terms.items():
        if not isinstance(term, Knowledge):
            raise KdlabError(
                f"knowledge.{name} built a {type(term).__name__}, not a kdlab Knowledge loss. Its _target_ "
                "must name a subclass of kdlab.knowledge.Knowledge."
            )
    return terms


def resolve_task_weight(task_weight: float | None, terms: list[Knowledge]) -> float:
    """The cross-entropy weight: as set, else the terms' recipe value if they agree, else 1."""
    if task_weight is not None:
        return float(task_weight)
    recipes = {term.task_weight for term in terms}
    return recipes.pop() if len(recipes) == 1 else 1.0


class StepTerms:
    """One epoch's training terms and total, a row per step on the device, read back only when folded.

    A step writes its row with one `torch.stack` into a preallocated buffer: no host sync, and one
    small tensor op where a running sum and a device-side finiteness flag took eight (each costs
    microseconds of Python and dispatch on every step). `fold` (at the loggers' cadence and the
    epoch's end) waits for the device: it adds the pending rows to the epoch's sum, or returns the
    first one whose total (the last column) is not finite.
    """

    def __init__(self, keys: tuple[str, ...], device: torch.device, capacity: int = 64):
        self.keys = keys
        self.names = [*(f"train/{key}" for key in keys), "train/loss"]
        self.rows = torch.empty(capacity, len(self.names), device=device)
        self.row_views = self.rows.unbind()  # made once: indexing a row is a tensor op too
        self.steps: list[int] = []  # the global step of each pending row
        self.sum = torch.zeros(len(self.names), device=device)
        self.count = 0  # the steps in `sum`

    def add(self, values: list[Tensor], step: int) -> Tensor:
        """Write a step's values (detached, float32, total last) as the next row; return the row."""
        if len(self.steps) == len(self.row_views):  # more steps between folds than rows: grow
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
            self.row_views = self.rows.unbind()
        row = self.row_views[len(self.steps)]
        torch.stack(values, out=row)
        self.steps.append(step)
        return row

    def fold(self) -> tuple[int, Tensor] | None:
        """Add the pending rows to the sum; or, if one's total is not finite, the first such (step, row)."""
        pending = self.rows[: len(self.steps)]
        finite = torch.isfinite(pending[:, -1])
        if not bool(finite.all()):
            first = int((~finite).int().argmax())
            return self.steps[first], pending[first]
        self.sum += pending.sum(dim=0)
        self.count += len(self.steps)
        self.steps.clear()
        return None

    def means(self) -> Tensor:
        return self.sum / max(self.count, 1)


class Scheme(L.LightningModule):
    """Base of all schemes.

    Args:
        optimizer: a partial optimizer, called with the trainable parameters.
        num_classes / input_shape: from the datamodule; used to check the models.
        task: what the models predict and how it is scored (kdlab.tasks); None: image
            classification of `num_classes` classes on inputs of `input_shape`.
        knowledge: the configured `Knowledge` losses by name (a scheme may copy them per
            direction, e.g. one per pair of peers).
        scheduler: a partial LR scheduler, stepped every `scheduler_interval`.
        task_weight: cross-entropy weight; null takes the knowledge terms' recipe value when
            they agree (e.g. 0.1 for KD alone, 0.7 for BYOT's pair), else 1.0.
        num_samples: the training split's index count, for losses with per-sample state.
    """

    #: the scheme's name in metrics.json, logger tags and the log
    name = "scheme"
    #: the tasks (kdlab.tasks names) the scheme's method is defined for
    tasks = ("image", "lm")

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """What this scheme learns from, obtained before it is built: by default, nothing.

        Called by the entry point (and scripts/bench.py) for every scheme the same way. A scheme
        that needs a frozen teacher asks `store` for it; one that trains peers builds them here.
        """
        return Sources()

    @classmethod
    def check_task(cls, task: Task) -> None:
        """Refuse a task the scheme's method is not defined for (the entry point asks before obtaining
        the sources, so no teacher is trained for a run that cannot start)."""
        if task.name not in cls.tasks:
            raise KdlabError(
                f"mode={cls.name} is defined for task={' or task='.join(cls.tasks)}, and this run's task is "
                f"{task.name}. Pick a scheme of task={task.name}: "
                f"{SCHEMES_OF_TASK.get(task.name, '--help lists them')}."
            )

    def __init__(
        self,
        optimizer: OptimizerFactory,
        num_classes: int,
        input_shape: tuple[int, int, int],
        knowledge: Mapping[str, nn.Module] | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        task_weight: float | None = None,
        num_samples: int | None = None,
        task: Task | None = None,
    ):
        super().__init__()
        self.task = task if task is not None else ImageClassification(num_classes, input_shape)
        self.check_task(self.task)
        # The configured terms. Subclasses register the live ones under `self.knowledge` (the
        # templates themselves for one student; copies per direction for peers).
        self.templates = checked_knowledge(knowledge)
        self.knowledge = nn.ModuleDict()
        self.num_samples = num_samples
        self.task_weight = resolve_task_weight(task_weight, list(self.templates.values()))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.num_classes = self.task.num_classes
        # Lightning uses this for the model summary; subclasses use it for their dry forward.
        self.example_input_array = self.task.example_input(2)
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        # Models tested per head as well, by name: (the model, a tap on its heads); add_head_metrics.
        self._head_taps: dict[str, tuple[nn.Module, FeatureTap]] = {}
        # This epoch's training terms, a row per step on the device; see log_terms and check_finite.
        self._step_terms: StepTerms | None = None

    def loss_context(self) -> LossContext:
        """The run's state as the knowledge terms are given it (epoch 0 before training starts)."""
        trainer = self._trainer  # read once: this runs every step
        if trainer is None:
            return LossContext(num_samples=self.num_samples)
        return LossContext(self.num_samples, trainer.current_epoch, trainer.max_epochs, trainer.global_step)

    # ------------------------------------------------------------ what subclasses provide
    def trained_models(self) -> dict[str, nn.Module]:
        """The models being optimised, by name (validated every epoch)."""
        raise NotImplementedError

    def models(self) -> dict[str, nn.Module]:
        """The models reported in the results table (trained ones, plus e.g. a frozen teacher)."""
        return self.evaluated_models()

    def evaluated_models(self) -> dict[str, nn.Module]:
        """The trained models as they are validated (a student deployed with parts of a loss: SimKD)."""
        return self.trained_models()

    def deployable(self) -> nn.Module:
        """What run.py saves as the student: the trained student alone (no teacher, peers' partners or
        exits), or the model a loss deploys in its place (SimKD's: student + projector + teacher's head)."""
        return self.trained_models()["student"]

    def deployed_architecture(self, architecture: str) -> str:
        """The architecture name of what `deployable` returns, given the student's."""
        return architecture

    def knowledge_terms(self) -> list[Knowledge]:
        """Every live loss term registered under `self.knowledge`, however it is nested."""
        return [m for m in self.knowledge.modules() if isinstance(m, Knowledge)]

    def add_metrics(self, name: str, validate: bool = True) -> None:
        """The task's metrics (top-1, ...) for a reported model on test, and on validation if `validate`."""
        if validate:
            self.val_metrics[name] = self.task.metrics(f"val/{name}/")
        self.test_metrics[name] = self.task.metrics(f"test/{name}/")

    def check_logits(self, logits: Tensor, role: str) -> None:
        self.task.check_logits(logits, role)

    def counted(self, outputs: Outputs, batch: Mapping[str, Tensor]) -> tuple[Outputs, Mapping[str, Tensor]]:
        """The outputs and batch as the task loss and the knowledge terms read them: for a language model,
        the logits `[N, V]` and labels `[N]` of the counted tokens (kdlab.tasks), and the batch's
        `positions`, the `[B, T]` mask of those tokens (for losses that read whole sequences, e.g. MiniLM's
        relations); for images, unchanged."""
        if outputs.logits.ndim == 2:  # every step of an image run: nothing to copy
            return outputs, batch
        target = batch.get("target")
        # No labels (a dry run): every position counts.
        labels = target if target is not None else outputs.logits.new_zeros(outputs.logits.shape[:-1]).long()
        logits, labels = self.task.predictions(outputs.logits, labels)
        counted = (
            dict(batch)
            if target is None
            else {**batch, "target": labels, "positions": target != IGNORE_INDEX}
        )
        return Outputs(logits, outputs.feats, outputs.views, outputs.model), counted

    def loss_to_backpropagate(self, total: Tensor, task: Tensor | Callable[[], Tensor]) -> Tensor:
        """What Lightning backpropagates: the total, or with DOT (kdlab.optim) the task part only.

        DOT keeps a momentum of its own for the distillation gradient, so that gradient is taken
        here (the distillation part is total - task) and handed to the optimizer; `p.grad` then
        holds the task gradient alone when the optimizer steps. `task` may be a function that
        computes the task part: only DOT needs it, so other runs skip its tensor op every step.
        """
        optimizer = self._dot_optimizer()
        if optimizer is None:
            return total
        task = task() if callable(task) else task
        distill = total - task
        # No distillation term counts (none configured, or all weighted 0, e.g. AB's main fit): plain SGD.
        if not distill.requires_grad or not any(t.weight for t in self.knowledge_terms()):
            return total
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Lightning divides the loss it backpropagates by the accumulation count; the same here.
        scale = 1.0 / max(self.trainer.accumulate_grad_batches, 1)
        grads = torch.autograd.grad(distill * scale, params, retain_graph=True, allow_unused=True)
        optimizer.add_distillation_grads(params, grads)
        return task

    def _dot_optimizer(self) -> DOT | None:
        if self._trainer is None or not self.automatic_optimization:
            return None
        optimizers = getattr(self.trainer, "optimizers", None)  # None: no optimizer set up (a bare step)
        optimizer = optimizers[0] if optimizers else None
        if not isinstance(optimizer, DOT):
            return None
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and not getattr(strategy, "_ddp_kwargs", {}).get(
            "find_unused_parameters"
        ):
            raise KdlabError(
                "dot.enabled=true under DDP: DOT takes the distillation gradient outside DDP's reducer, so "
                "DDP would report the loss adapters, which only distillation reaches, as unused. Set "
                "trainer.strategy=ddp_find_unused_parameters_true (DOT averages its distillation gradient "
                "over the processes itself)."
            )
        if str(self.trainer.precision).startswith("16"):
            raise KdlabError(
                f"dot.enabled=true with trainer.precision={self.trainer.precision}: DOT takes the "
                "distillation gradient itself, outside the fp16 gradient scaler, so the two gradients would "
                "be on different scales. Use trainer.precision=bf16-mixed or 32-true with DOT."
            )
        return optimizer

    # ------------------------------------------------------- stages before the main fit
    def stage_outputs(self, batch: Mapping[str, Tensor]) -> tuple[Any, Any]:
        """The student's and the source's Outputs for a stage's batch (kdlab.stages).

        Stages (AB's initialisation, FT's paraphraser) train one student towards a fixed source, so
        only the one-student schemes provide this.
        """
        staged = [f"knowledge.{t.name}" for t in self.templates.values() if t.stages()]
        raise KdlabError(
            f"{', '.join(staged) or 'A loss'} runs a stage before the main fit (e.g. AB's initialisation or "
            f"FT's paraphraser), which trains one student towards a fixed source, but mode={self.name} has "
            "no fixed source to train towards. Use it with mode=offline."
        )

    def stage_parameters(self, term: Knowledge, stage: Any) -> list[nn.Parameter]:
        """What `stage` of `term` trains: the modules it names, and the student's layers if it says so."""
        params = [p for module in term.stage_modules(stage.name) for p in module.parameters()]
        if stage.trains_student:
            student = next(iter(self.trained_models().values()))
            try:  # the classifier is left alone: a stage's loss does not reach it
                head = {id(p) for p in classifier_of(student).parameters()}
            except KdlabError:
                head = set()
            params += [p for p in student.parameters() if id(p) not in head]
        unique = {id(p): p for p in params if p.requires_grad}
        return list(unique.values())

    # ---------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        self._step_terms = None  # a fresh sum (a resumed epoch averages its own steps)

    def log_terms(self, terms: Mapping[str, Tensor], loss: Tensor) -> None:
        """Each unweighted term on its own (train/<name>) and the weighted total (train/loss).

        The loggers get `<name>_step` and `<name>_epoch`, and trainer.callback_metrics holds
        `<name>`, the epoch value, once the epoch ends. A `self.log` call costs a few hundred
        microseconds of Python, so the step values are logged only on the steps the loggers write
        (every trainer.log_every_n_steps; the progress bar's loss updates as often), and from the host:
        Lightning reads the progress bar's value with `.item()` on every step until the next log, which
        for a device tensor would wait for the GPU every step. Every step adds its values to the epoch's
        rows on the device (StepTerms: one tensor op, no host sync); their mean is logged once when the
        epoch ends, averaged over processes under DDP (sync_dist: one all-reduce per epoch).
        """
        keys = tuple(terms)
        values = [value.detach().float() for value in terms.values()]
        values.append(loss.detach().float())
        epoch = self._step_terms
        if epoch is None or epoch.keys != keys or epoch.rows.device != loss.device:
            self.check_finite()  # the steps so far, before other terms (or another device) start afresh
            epoch = self._step_terms = StepTerms(keys, loss.device)
        trainer = self._trainer  # None outside a fit (e.g. a test's training_step): nothing to log to
        step = trainer.global_step if trainer is not None else 0
        row = epoch.add(values, step)
        # The steps the loggers write: Lightning's condition, (batches that stepped + 1) % n.
        if trainer is not None and (step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            for name, value in zip(epoch.names, row.cpu(), strict=True):
                self.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=name == "train/loss")

    def on_train_epoch_end(self) -> None:
        # Before the monitoring callbacks (checkpoints, early stopping) read the epoch's metrics, so
        # an epoch with a non-finite loss saves no checkpoint.
        self.check_finite()
        if self._step_terms is None:
            return
        terms, self._step_terms = self._step_terms, None
        sync = world_size() > 1
        for name, value in zip(terms.names, terms.means(), strict=True):
            bar = name == "train/loss"
            self.log(f"{name}_epoch", value, on_step=False, on_epoch=True, prog_bar=bar, sync_dist=sync)
            self.log(name, value, on_step=False, on_epoch=True, logger=False, sync_dist=sync)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # At the loggers' cadence only: reading the steps' values waits for the device.
        trainer = self.trainer
        if (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def check_finite(self) -> None:
        """Stop with a clear error if any step so far had a NaN or infinite loss."""
        bad = self._step_terms.fold() if self._step_terms is not None else None
        if bad is None:
            return
        step, row = bad
        values = ", ".join(
            f"{name.removeprefix('train/')}={float(v):.4g}"
            for name, v in zip(self._step_terms.names, row, strict=True)
        )
        raise KdlabError(
            f"The training loss became {float(row[-1])} at step {step} (epoch {self.current_epoch}; terms at "
            f"that step: {values}), so training stopped. Checkpoints saved before it are kept in the run "
            "directory; a teacher being trained is not stored. Lower the learning rate (optimizer.lr), lower "
            "the weight of the term that diverged (knowledge.<name>.weight), or check the data."
        )

    # -------------------------------------------------------------------- evaluation
    def add_head_metrics(self, name: str, model: nn.Module) -> None:
        """Test a model that averages several heads' logits (DeiT's class and distillation heads, timm's
        `class_head` and `distillation_head` tap points) per head too, as the rows `<name>_<head>`;
        its own row is their average, as it is deployed. Read from the same forward pass."""
        heads = [head for head in SEPARATE_HEADS if head in getattr(model, "tap_points", {})]
        if len(heads) < 2:
            return
        self._head_taps[name] = (model, FeatureTap(model, heads, role=name))
        for head in heads:
            self.add_metrics(f"{name}_{head}", validate=False)

    def evaluate(self, stage: str, models: Mapping[str, nn.Module], batch: Mapping[str, Tensor]) -> dict:
        """Update and log each model's `stage` metrics (and its heads', see `add_head_metrics`); return
        the models' logits for subclasses."""
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        logits, heads = {}, {}
        for name, model in models.items():
            tapped = self._head_taps.get(name)
            if tapped is not None and tapped[0] is model:
                out = tapped[1](batch["input"])
                logits[name] = out.logits
                heads.update({f"{name}_{head}": value for head, value in out.feats.items()})
            else:
                logits[name] = model(batch["input"])
        for name, out in {**logits, **heads}.items():
            if name in metrics:
                metrics[name].update(*self.task.predictions(out, batch["target"]))
                self.log_dict(metrics[name], on_epoch=True, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.evaluate("val", self.evaluated_models(), batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.evaluate("test", self.models(), batch)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained models' and the live loss adapters' parameters: never a frozen teacher's, nor
        what only a loss's stages train (`Knowledge.stage_only_modules`)."""
        params = [p for model in self.trained_models().values() for p in model.parameters()]
        params += [p for term in self.knowledge_terms() for p in term.parameters()]
        stage_only = {id(p) for module in self.stage_only_modules() for p in module.parameters()}
        unique = {id(p): p for p in params if p.requires_grad and id(p) not in stage_only}
        return list(unique.values())

    def stage_only_modules(self) -> list[nn.Module]:
        """The live terms' modules that only their stages train."""
        return [module for term in self.knowledge_terms() for module in term.stage_only_modules()]

    def setup(self, stage: str) -> None:
        # Before Lightning wraps the model (DDP records what requires a gradient): what only a stage
        # trains is fixed in the main fit.
        if stage == "fit":
            for module in self.stage_only_modules():
                module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.stage_only_modules():
            module.eval()  # fixed in the main fit: BatchNorm on the statistics its stage left
        return self

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
