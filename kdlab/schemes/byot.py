"""Be Your Own Teacher (`mode=byot`, also `mode=self`): auxiliary exits taught by the deepest exit.

Zhang et al. 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks
via Self Distillation" (ICCV). The model teaches itself: no teacher is obtained before the run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.exits import AuxiliaryExits
from kdlab.models.lm_exits import LanguageModelExits
from kdlab.schemes.student import StudentScheme
from kdlab.taps import FeatureTap, Outputs, expand_layers
from kdlab.tasks import LanguageModeling


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

    name = "byot"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.task, LanguageModeling):  # a head after each shallow block
            self.exits = LanguageModelExits(self.student, self.num_classes)
        else:
            self.exits = AuxiliaryExits(
                self.student, self.num_classes, tuple(self.example_input_array.shape[1:])
            )
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
        return nn.ModuleDict(
            {
                name: term.with_layers(exit_layers(term.student_layers), exit_layers(term.teacher_layers))
                for name, term in self.templates.items()
            }
        )

    def exit_outputs(self, x: Tensor) -> dict[str, Outputs]:
        """Every exit's outputs, the deepest last (as "student"), from one backbone pass."""
        tapped = self.student_tap(x)
        outputs = {}
        # A language model's exits give hidden states, read as a sequence (kdlab.knowledge.layouts).
        source = self.exits if getattr(self.exits, "sequence_features", False) else None
        for stage, (fmap, logits) in self.exits({s: tapped.feats[s] for s in self.exits.stage_names}).items():
            outputs[self.exit_names[stage]] = exit_view(logits, fmap, source)
        outputs[self.model_name] = exit_view(tapped.logits, tapped.feats[self.exits.deepest], source)
        return outputs

    @torch.no_grad()
    def prepare(self) -> None:
        if not hasattr(self, "exits"):
            return  # StudentScheme's tap is replaced first; the exits are built in __init__
        was_training = self.training
        self.eval()
        try:
            outputs = self.exit_outputs(self.example_input_array)
            for name, out in outputs.items():
                self.check_logits(out.logits, name)
            outputs = {name: self.counted(out, {})[0] for name, out in outputs.items()}
            deepest = outputs[self.model_name].detach()
            context = self.loss_context()
            for name, terms in self.knowledge.items():
                for term in terms.values():
                    term.build(outputs[name], deepest, context)
        finally:
            self.train(was_training)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.exit_outputs(batch["input"])
        # A language model's counted tokens, as the task loss and the terms read them (kdlab.tasks).
        counted = {name: self.counted(out, batch) for name, out in outputs.items()}
        outputs, batch = {name: out for name, (out, _) in counted.items()}, counted[self.model_name][1]
        deepest = outputs[self.model_name]
        terms = {f"{self.model_name}/task": self.task.loss(deepest.logits, batch["target"])}
        loss = terms[f"{self.model_name}/task"]
        source, context = deepest.detach(), self.loss_context()
        task_part = loss
        for name, exit_terms in self.knowledge.items():
            task = self.task.loss(outputs[name].logits, batch["target"])
            terms[f"{name}/task"] = task
            loss = loss + self.task_weight * task
            task_part = task_part + self.task_weight * task
            for term_name, term in exit_terms.items():
                value = term(outputs[name], source, batch, context)
                terms[f"{name}/{term_name}"] = value
                loss = loss + term.weight * value
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, task_part)

    def trained_models(self) -> dict[str, nn.Module]:
        return {self.model_name: self.student}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), *self.exits.parameters()]

    def _evaluate_exits(self, stage: str, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = {name: out.logits for name, out in self.exit_outputs(batch["input"]).items()}
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        # The log of the exits' mean probabilities: the logits of the ensemble's distribution.
        logits["exits_ensemble"] = torch.stack([v.softmax(dim=-1) for v in logits.values()]).mean(0).log()
        for name, out in logits.items():
            metrics[name].update(*self.task.predictions(out, batch["target"]))
            self.log_dict(metrics[name], on_epoch=True, prog_bar=stage == "val" and name == self.model_name)
        return logits

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_exits("val", batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_exits("test", batch)


def exit_layers(names: tuple[str, ...]) -> tuple[str, ...]:
    """Layer names as an exit offers them: the pooled `embedding`, else its feature map."""
    return tuple(dict.fromkeys("embedding" if name == "embedding" else "features" for name in names))


def exit_view(logits: Tensor, fmap: Tensor, source: nn.Module | None = None) -> Outputs:
    """An exit's outputs: its feature map (a sequence's hidden states), and that pooled as `embedding`."""
    pooled = fmap.mean(dim=1) if fmap.ndim == 3 else F.adaptive_avg_pool2d(fmap, 1).flatten(1)
    return Outputs(logits, {"features": fmap, "embedding": pooled}, model=source)
