"""Schemes with one student that learns from one source per batch (baseline, offline, self).

The student is tapped for the layers its knowledge terms read; `sources()` says what teaches it
on this batch (nothing, a frozen teacher, ...). The loss is the weighted sum of the task loss
and each knowledge term, each logged on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdlab.data.datasets import view_key
from kdlab.errors import KdlabError
from kdlab.knowledge import views_of
from kdlab.schemes.base import Scheme
from kdlab.taps import FeatureTap, Outputs, expand_layers


class StudentScheme(Scheme):
    """One trained model (`model_name`, "student" by default) and its knowledge terms.

    Subclasses attach their source, then call `self.prepare()`.
    """

    def __init__(self, student: nn.Module, *args, model_name: str = "student", **kwargs):
        super().__init__(*args, **kwargs)
        self.student = student
        self.model_name = model_name
        # What is evaluated and saved in the student's place when a loss says so (SimKD); kept out
        # of the module tree (a tuple), since its parts are the student's, the loss's and the source's.
        self._deployed: tuple[nn.Module, str] | None = None
        self.knowledge = nn.ModuleDict(self.templates)  # each tap() rebinds them to copies
        # The extra views the terms read (their copies read the same): listed once, not every step.
        self.extra_views = views_of(self.templates.values())
        self.student_tap = self.tap(student, "student", model_name)
        self.add_metrics(model_name)
        self.add_head_metrics(model_name, student)

    def tap(self, model: nn.Module, side: str, role: str) -> FeatureTap:
        """A tap on `model` for the layers the knowledge terms read on `side` (student/teacher).

        Group names ("stages", "last_stage") are expanded for this model first: each live term
        is rebound to the expanded names (`Knowledge.with_layers`), so it finds them in `Outputs.feats`.
        """
        for name, term in self.knowledge.items():
            term.check_model(model, side, role)
            student_layers, teacher_layers = term.student_layers, term.teacher_layers
            if side == "student":
                student_layers = expand_layers(model, student_layers, role)
            else:
                teacher_layers = expand_layers(model, teacher_layers, role)
            self.knowledge[name] = term.with_layers(student_layers, teacher_layers)
        layers = [layer for t in self.knowledge.values() for layer in getattr(t, f"{side}_layers")]
        return FeatureTap(model, layers, role)

    def trained_models(self) -> dict[str, nn.Module]:
        return {self.model_name: self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {self.model_name: self.deployable()}

    def deployable(self) -> nn.Module:
        return self._deployed[0] if self._deployed is not None else self.student

    def deployed_architecture(self, architecture: str) -> str:
        return f"{architecture} {self._deployed[1]}" if self._deployed is not None else architecture

    def sources(self, x: Tensor, batch: Mapping[str, Tensor]) -> Outputs | None:
        """The knowledge source for this batch (detached), or None when there is none."""
        return None

    @torch.no_grad()
    def prepare(self) -> None:
        """One dry forward: check the models' shapes and build the losses' adapters."""
        was_training = self.student.training
        self.student.eval()  # so the dry pass leaves BatchNorm statistics untouched
        try:
            x = self.example_input_array
            student = self.student_tap(x)
            self.check_logits(student.logits, self.model_name)
            source = self.sources(x, {})
            self.add_views(student, source, {view_key(view): x for view in self.extra_views})
            if source is not None:
                self.check_logits(source.logits, "teacher")
                context = self.loss_context()
                student, _ = self.counted(student, {})
                source, _ = self.counted(source, {})
                for term in self.knowledge.values():
                    term.build(student, source, context)
                self._deployed = self._deployed_student(source)
        finally:
            self.student.train(was_training)

    def _deployed_student(self, source: Outputs) -> tuple[nn.Module, str] | None:
        deployed = [
            (module, term.deployed_description())
            for term in self.knowledge.values()
            if (module := term.deployed_student(self.student, source)) is not None
        ]
        if len(deployed) > 1:
            names = [f"knowledge.{t.name}" for t in self.knowledge.values() if t.deployed_description()]
            raise KdlabError(
                f"{' and '.join(names)} each replace the deployed student (e.g. SimKD classifies it with the "
                "teacher's classifier), and a run can deploy one model only. Use one of them per run."
            )
        return deployed[0] if deployed else None

    def forward(self, x: Tensor) -> Tensor:
        return self.deployable()(x)

    def loss_terms(self, student: Outputs, source: Outputs | None, batch: Mapping[str, Tensor]) -> dict:
        """Unweighted loss terms: the task loss plus each knowledge term, over the positions that count."""
        student, counted = self.counted(student, batch)
        terms = {"task": self.task.loss(student.logits, counted["target"])}
        if source is not None:
            source, _ = self.counted(source, batch)
            batch = counted
            context = self.loss_context()
            for name, term in self.knowledge.items():
                terms[name] = term(student, source, batch, context)
        return terms

    def weighted_sum(self, terms: Mapping[str, Tensor]) -> Tensor:
        # Every step: a task weight of 1 (the baseline's) costs no tensor op, and each term's weight is
        # applied by its add (alpha), so a term costs one op and autograd node rather than two.
        loss = terms["task"] if self.task_weight == 1.0 else self.task_weight * terms["task"]
        for name, term in self.knowledge.items():
            if name in terms:
                loss = torch.add(loss, terms[name], alpha=term.weight)
        return loss

    def add_views(self, student: Outputs, source: Outputs | None, batch: Mapping[str, Tensor]) -> None:
        """Run the student and the source on each extra view the terms read (into `Outputs.views`).

        The source is asked without the batch's indices, so it runs on the view itself (a cache of
        the teacher's outputs holds the main input's only).
        """
        for view in self.extra_views:
            x = batch[view_key(view)]
            student.views[view] = self.student_tap(x)
            if source is not None:
                source.views[view] = self.sources(x, {})

    def stage_outputs(self, batch: Mapping[str, Tensor]) -> tuple[Outputs, Outputs | None]:
        """The student's and the source's outputs for a stage before the main fit (kdlab.stages)."""
        x = batch["input"]
        student = self.student_tap(x)
        source = self.sources(x, batch)
        if source is None:
            return super().stage_outputs(batch)  # no fixed source to train towards: the clear error
        self.add_views(student, source, batch)
        return student, source

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["input"]
        student = self.student_tap(x)
        source = self.sources(x, batch)
        self.add_views(student, source, batch)
        terms = self.loss_terms(student, source, batch)
        loss = self.weighted_sum(terms)
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, lambda: self.task_weight * terms["task"])
