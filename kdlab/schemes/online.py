"""Online distillation: peers trained together from scratch, each teaching the others.

Deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning", Eq. 10): each peer minimises
its task loss plus the knowledge from every other peer, averaged over those peers, with the
other peers' outputs detached. One summed loss and one backward give every peer exactly its
own gradient, so Lightning's automatic optimisation, gradient clipping, accumulation,
schedulers and DDP all work unchanged.

Any knowledge works between peers: each (learner, source) direction gets its own copy of each
configured term, built from the two models' real shapes, so adapters exist in each direction.
With `target="ensemble"` each peer learns instead from the peers' ensemble, the mean of their
logits (KDCL-Naive, Guo et al. 2020; the unweighted form of ONE, Lan et al. 2018), which only
response-based knowledge can read. Every peer and the ensemble (mean of the peers' softmax) are
validated and tested.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdlab.build import build_model
from kdlab.data.datasets import view_key
from kdlab.errors import KdlabError
from kdlab.knowledge import views_of
from kdlab.schemes.base import Scheme, Sources, TeacherProvider
from kdlab.taps import FeatureTap, Outputs, expand_layers

TARGETS = ("peers", "ensemble")
ENSEMBLE = "ensemble"


class Online(Scheme):
    """N >= 2 trainable peers: the configured teacher and student models, plus `extra_peers`.

    Peers are named "teacher", "student", then "peer3", "peer4", ... in metric keys.
    """

    name = "online"

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """Fresh, trainable peers: the configured teacher model, and `mode.extra_peers` (built like
        the student, under their own model names)."""
        teacher = build_model(cfg.teacher)
        names = list(cfg.mode.get("extra_peers") or [])
        extra = [build_model(cfg.student, name=name) for name in names]
        architectures = {"teacher": cfg.teacher.name}
        architectures.update({peer_name(i): name for i, name in enumerate(names)})
        return Sources(modules={"teacher": teacher, "extra_peers": extra}, architectures=architectures)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *args,
        extra_peers: list[nn.Module] | tuple = (),
        target: str = "peers",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if target not in TARGETS:
            raise KdlabError(
                f"mode.target={target!r} is not one of {', '.join(TARGETS)}: 'peers' learns from every "
                "other peer (deep mutual learning), 'ensemble' from the peers' averaged logits (KDCL, ONE)."
            )
        self.target = target
        named = {"teacher": teacher, "student": student}
        named.update({peer_name(i): peer for i, peer in enumerate(extra_peers)})
        self.peers = nn.ModuleDict(named)
        self.knowledge = nn.ModuleDict({learner: self._directions(learner) for learner in self.peers})
        self.taps = {
            name: FeatureTap(peer, self._layers_of(name), role=name) for name, peer in self.peers.items()
        }
        for name, peer in self.peers.items():
            self.add_metrics(name)
            self.add_head_metrics(name, peer)
        self.add_metrics(ENSEMBLE)
        self.prepare()

    # ---------------------------------------------------------------- construction
    def _sources_of(self, learner: str) -> list[str]:
        return [ENSEMBLE] if self.target == ENSEMBLE else [name for name in self.peers if name != learner]

    def _directions(self, learner: str) -> nn.ModuleDict:
        """A copy of every configured term for each source this learner learns from."""
        directions = nn.ModuleDict()
        for source in self._sources_of(learner):
            terms = nn.ModuleDict()
            for name, template in self.templates.items():
                template.check_model(self.peers[learner], "student", learner)
                if source != ENSEMBLE:
                    template.check_model(self.peers[source], "teacher", source)
                student_layers = expand_layers(self.peers[learner], template.student_layers, learner)
                if source == ENSEMBLE:
                    if template.teacher_layers:
                        raise KdlabError(
                            f"mode.target=ensemble gives each peer the peers' averaged logits, which carry "
                            f"no features, but knowledge.{name} reads {list(template.teacher_layers)}. Use "
                            "response-based knowledge (e.g. knowledge=dml, kd, dkd or dist), or "
                            "mode.target=peers."
                        )
                    teacher_layers = []
                else:
                    teacher_layers = expand_layers(self.peers[source], template.teacher_layers, source)
                terms[name] = template.with_layers(student_layers, teacher_layers)
            directions[source] = terms
        return directions

    def _layers_of(self, peer: str) -> list[str]:
        """Every layer of `peer` some term reads: as a learner, or as another learner's source."""
        layers = [
            layer
            for terms in self.knowledge[peer].values()
            for t in terms.values()
            for layer in t.student_layers
        ]
        for directions in self.knowledge.values():
            if peer in directions:
                layers += [layer for t in directions[peer].values() for layer in t.teacher_layers]
        return layers

    @torch.no_grad()
    def prepare(self) -> None:
        """One dry forward of every peer: check the logits and build each direction's adapters."""
        modes = {name: peer.training for name, peer in self.peers.items()}
        self.peers.eval()  # so the dry pass leaves BatchNorm statistics untouched
        try:
            x = self.example_input_array
            outputs = self.forward_peers(x, {view_key(view): x for view in views_of(self.templates.values())})
            for name, out in outputs.items():
                self.check_logits(out.logits, name)
            outputs = {name: self.counted(out, {})[0] for name, out in outputs.items()}
            context = self.loss_context()
            for learner, directions in self.knowledge.items():
                for source, terms in directions.items():
                    for term in terms.values():
                        term.build(outputs[learner], self.source_outputs(outputs, source), context)
        finally:
            for name, peer in self.peers.items():
                peer.train(modes[name])

    # -------------------------------------------------------------------- training
    def forward_peers(self, x: Tensor, batch: Mapping[str, Tensor] | None = None) -> dict[str, Outputs]:
        """Every peer's outputs on `x`, and on each extra view of `batch` the terms read."""
        outputs = {name: tap(x) for name, tap in self.taps.items()}
        for view in views_of(self.templates.values()) if batch is not None else ():
            for name, out in self.forward_peers(batch[view_key(view)]).items():
                outputs[name].views[view] = out
        return outputs

    def source_outputs(self, outputs: Mapping[str, Outputs], source: str) -> Outputs:
        """What a learner sees of `source`: that peer's outputs, or the ensemble's, detached."""
        if source == ENSEMBLE:
            mean = torch.stack([out.logits for out in outputs.values()]).mean(0).detach()
            views = {
                view: self.source_outputs({name: out.views[view] for name, out in outputs.items()}, ENSEMBLE)
                for view in next(iter(outputs.values())).views
            }
            return Outputs(mean, views=views)
        return outputs[source].detach()

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.forward_peers(batch["input"], batch)
        # A language model's counted tokens, as the task loss and the terms read them (kdlab.tasks).
        counted = {name: self.counted(out, batch) for name, out in outputs.items()}
        outputs, batch = {name: out for name, (out, _) in counted.items()}, next(iter(counted.values()))[1]
        context = self.loss_context()
        terms: dict[str, Tensor] = {}
        loss = torch.zeros((), device=batch["input"].device)
        task_part = torch.zeros((), device=batch["input"].device)
        for learner, directions in self.knowledge.items():
            task = self.task.loss(outputs[learner].logits, batch["target"])
            terms[f"{learner}/task"] = task
            loss = loss + self.task_weight * task
            task_part = task_part + self.task_weight * task
            for name, template in self.templates.items():
                # DML Eq. 10: the knowledge from the other peers is averaged over them.
                per_source = [
                    terms_of_source[name](
                        outputs[learner], self.source_outputs(outputs, source), batch, context
                    )
                    for source, terms_of_source in directions.items()
                ]
                value = torch.stack(per_source).mean()
                terms[f"{learner}/{name}"] = value
                loss = loss + template.weight * value
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, task_part)

    def forward(self, x: Tensor) -> Tensor:
        return self.peers["student"](x)

    def trained_models(self) -> dict[str, nn.Module]:
        return dict(self.peers.items())

    # ------------------------------------------------------------------ evaluation
    def _with_ensemble(self, stage: str, logits: dict[str, Tensor], batch: Mapping[str, Tensor]) -> dict:
        probs = torch.stack([out.softmax(dim=-1) for out in logits.values()]).mean(0)
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[ENSEMBLE]
        # The log of the mean probabilities: logits of the ensemble's distribution (perplexity reads them).
        metrics.update(*self.task.predictions(probs.log(), batch["target"]))
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._with_ensemble("val", super().validation_step(batch, batch_idx), batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._with_ensemble("test", super().test_step(batch, batch_idx), batch)


def peer_name(extra_index: int) -> str:
    """The metric name of the `extra_index`-th extra peer: peer3, peer4, ... (after teacher and student)."""
    return f"peer{extra_index + 3}"
