"""Self-distillation (`mode=self`): a model teaches itself. `mode.method` picks how.

- `byot` (default): Be Your Own Teacher (Zhang et al. 2019). Auxiliary exits on the shallow
  stages learn from the deepest exit through the configured knowledge.
- `pskd`: Progressive Self-Knowledge Distillation (Kim et al. 2021). The source is the model's
  own predictions for each sample from the previous epoch.
- `born_again`: Born-Again Networks (Furlanello et al. 2018). Generation k, with the student's
  architecture, distils from generation k-1; run.py obtains the chain through the teacher store.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.models.exits import AuxiliaryExits
from kdlab.schemes.offline import Offline
from kdlab.schemes.pskd_bank import PredictionBank
from kdlab.schemes.student import StudentScheme
from kdlab.taps import FeatureTap, Outputs, expand_layers

METHODS = ("byot", "pskd", "born_again")


def refuse_feature_knowledge(templates: Mapping, method: str, source: str) -> None:
    for name, term in templates.items():
        if term.teacher_layers:
            raise KdlabError(
                f"mode.method={method} distils from {source}, which carry no features, but "
                f"knowledge.{name} reads {list(term.teacher_layers)}. Use response-based knowledge "
                "(e.g. knowledge=dml, kd, dkd or dist), or mode.method=byot, whose deepest exit has features."
            )


class BYOT(StudentScheme):
    """Be Your Own Teacher (Zhang et al. 2019, Sec. 3, Eq. 1-4).

    Each shallow stage gets an auxiliary exit (a bottleneck to the deepest stage's shape, then a
    classifier; `kdlab.models.exits`). The deepest exit, the model's own head, teaches every
    shallow exit through the configured knowledge, with its outputs detached. Each shallow exit
    also learns from the labels with the recipe's task weight, and the deepest exit from the
    labels with weight 1, as in the reference code. The recipe (`knowledge=byot`) is KL at
    tau=3 (weight 0.3, CE 0.7) plus an L2 hint between exit features (weight 0.03).

    Knowledge compares exits: each exit offers its feature map (the deepest stage's shape) under
    every layer name except `embedding`, which is the globally pooled feature map. The exits
    are separate modules: `self.student` is the unmodified backbone, deployable without them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exits = AuxiliaryExits(self.student, self.num_classes, tuple(self.example_input_array.shape[1:]))
        self.exit_names = {stage: f"exit{i + 1}" for i, stage in enumerate(self.exits.stage_names)}
        stages = expand_layers(self.student, ["stages"], self.model_name)
        self.student_tap = FeatureTap(self.student, stages, role=self.model_name)
        # One copy of each term per exit: adapters are per exit.
        self.knowledge = nn.ModuleDict({name: self._terms() for name in self.exit_names.values()})
        for name in self.exit_names.values():
            self.add_metrics(name)
        self.add_metrics("exits_ensemble")
        self.prepare()

    def _terms(self) -> nn.ModuleDict:
        terms = nn.ModuleDict()
        for name, template in self.templates.items():
            term = copy.deepcopy(template)
            term.student_layers = exit_layers(template.student_layers)
            term.teacher_layers = exit_layers(template.teacher_layers)
            terms[name] = term
        return terms

    def exit_outputs(self, x: Tensor) -> dict[str, Outputs]:
        """Every exit's outputs, the deepest last (as "student"), from one backbone pass."""
        tapped = self.student_tap(x)
        outputs = {}
        for stage, (fmap, logits) in self.exits({s: tapped.feats[s] for s in self.exits.stage_names}).items():
            outputs[self.exit_names[stage]] = exit_view(logits, fmap)
        outputs[self.model_name] = exit_view(tapped.logits, tapped.feats[self.exits.deepest])
        return outputs

    @torch.no_grad()
    def prepare(self) -> None:
        if not hasattr(self, "exits"):
            return  # StudentScheme's tap is replaced first; the exits are built in __init__
        was_training = self.training
        self.eval()
        try:
            outputs = self.exit_outputs(self.example_input_array)
            deepest = outputs[self.model_name].detach()
            for name, terms in self.knowledge.items():
                self.check_logits(outputs[name].logits, name)
                for term in terms.values():
                    term.build(outputs[name], deepest)
        finally:
            self.train(was_training)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.exit_outputs(batch["input"])
        deepest = outputs[self.model_name]
        terms = {f"{self.model_name}/task": F.cross_entropy(deepest.logits, batch["target"])}
        loss = terms[f"{self.model_name}/task"]
        source = deepest.detach()
        for name, exit_terms in self.knowledge.items():
            task = F.cross_entropy(outputs[name].logits, batch["target"])
            terms[f"{name}/task"] = task
            loss = loss + self.task_weight * task
            for term_name, term in exit_terms.items():
                value = term(outputs[name], source, batch)
                terms[f"{name}/{term_name}"] = value
                loss = loss + term.weight * value
        self.log_terms(terms, loss)
        return loss

    def trained_models(self) -> dict[str, nn.Module]:
        return {self.model_name: self.student}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), *self.exits.parameters()]

    def _evaluate_exits(self, stage: str, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = {name: out.logits for name, out in self.exit_outputs(batch["input"]).items()}
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        logits["exits_ensemble"] = torch.stack([v.softmax(dim=1) for v in logits.values()]).mean(0)
        for name, out in logits.items():
            metrics[name].update(out, batch["target"])
            self.log_dict(metrics[name], on_epoch=True, prog_bar=stage == "val" and name == self.model_name)
        return logits

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_exits("val", batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_exits("test", batch)


def exit_layers(names: tuple[str, ...]) -> tuple[str, ...]:
    """Layer names as an exit offers them: the pooled `embedding`, else its feature map."""
    return tuple(dict.fromkeys("embedding" if name == "embedding" else "features" for name in names))


def exit_view(logits: Tensor, fmap: Tensor) -> Outputs:
    return Outputs(logits, {"features": fmap, "embedding": F.adaptive_avg_pool2d(fmap, 1).flatten(1)})


class PSKD(StudentScheme):
    """Progressive Self-Knowledge Distillation (Kim et al. 2021, Sec. 3, Eq. 5-7).

    The source for each sample is the model's own softmax for it from the previous epoch, kept
    in a `PredictionBank` keyed by `batch["index"]`. The loss is (1 - alpha_t) * task +
    alpha_t * sum_k w_k * knowledge_k, with alpha_t rising linearly from 0 at the first epoch to
    `alpha_T` at the last. With the default knowledge (`dml`: KL at T=1, weight 1) this is
    exactly PS-KD's cross-entropy against (1 - alpha_t) * y + alpha_t * p_{t-1}, up to a constant.
    A sample without an earlier prediction (the first epoch) is its own source, so its knowledge
    terms are zero. Paper default alpha_T = 0.8.
    """

    def __init__(self, *args, alpha_T: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_feature_knowledge(self.templates, "pskd", "the model's own past predictions")
        if not self.templates:
            raise KdlabError(
                "mode.method=pskd needs a knowledge term to compare the model with its past "
                "predictions. Use knowledge=dml (PS-KD's loss: KL at T=1)."
            )
        num_samples = next(iter(self.templates.values())).num_samples
        if not num_samples:
            raise KdlabError(
                "PS-KD keeps one prediction per training sample, so it needs the training split's "
                "size, but the scheme got none. Build it through kdlab.build, or pass num_samples."
            )
        self.bank = PredictionBank(num_samples, self.num_classes)
        PredictionBank.alpha(0, 2, alpha_T)  # raises the clear error for alpha_T outside [0, 1]
        self.alpha_T = float(alpha_T)
        self.prepare()

    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs:
        return Outputs(self.student(x).detach())  # the dry forward: the model is its own source

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        student = self.student_tap(batch["input"])
        epoch, index = self.current_epoch, batch["index"]
        previous, known = self.bank.previous(index, epoch)
        own = student.logits.detach()
        source = Outputs(torch.where(known[:, None], previous.clamp_min(1e-12).log(), own))
        terms = self.loss_terms(student, source, batch)
        alpha = PredictionBank.alpha(epoch, self.trainer.max_epochs or 1, self.alpha_T)
        loss = (1 - alpha) * self.task_weight * terms["task"]
        for name, term in self.knowledge.items():
            loss = loss + alpha * term.weight * terms[name]
        self.bank.store(index, own.softmax(dim=1), epoch)
        self.log("train/alpha", alpha, on_step=False, on_epoch=True, sync_dist=True)  # once per epoch
        self.log_terms(terms, loss)
        return loss


class BornAgain(Offline):
    """Born-Again Networks (Furlanello et al. 2018, Sec. 3): generation k distils from generation
    k-1 of the same architecture. This scheme trains the last generation; `teacher` is the one
    before it, and `earlier` the generations before that (tested and reported, never trained).
    run.py builds the chain through the teacher store, so an interrupted run resumes.
    """

    teacher_role = "generations"

    def __init__(self, *args, earlier: Mapping[str, nn.Module] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.earlier = nn.ModuleDict(dict(earlier or {}))
        self.earlier.eval().requires_grad_(False)
        for name in self.earlier:
            self.add_metrics(name, validate=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "earlier"):
            self.earlier.eval()
        return self

    def models(self) -> dict[str, nn.Module]:
        return {**self.earlier, **super().models()}


class SelfDistillation:
    """The `mode=self` entry: builds the scheme of `method` (byot, pskd or born_again)."""

    methods = {"byot": BYOT, "pskd": PSKD, "born_again": BornAgain}

    @classmethod
    def scheme_class(cls, method: str) -> type:
        if method not in cls.methods:
            raise KdlabError(
                f"mode.method={method!r} is not a self-distillation method. Choose one of "
                f"{', '.join(cls.methods)}: byot (exits taught by the deepest exit), pskd (the model's "
                "past predictions) or born_again (generations of the same architecture)."
            )
        return cls.methods[method]

    def __new__(cls, method: str = "byot", generations: int = 2, alpha_T: float = 0.8, **kwargs):
        scheme = cls.scheme_class(method)
        if scheme is PSKD:
            kwargs["alpha_T"] = alpha_T
        if scheme is not BornAgain:
            kwargs.pop("teacher", None)
            kwargs.pop("earlier", None)
        return scheme(**kwargs)
