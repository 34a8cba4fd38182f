"""SRD: the student's penultimate feature, judged by the teacher's own classifier.

Yang et al. 2021, "Knowledge Distillation via Softmax Regression Representation Learning"
(ICLR). Only the student's last representation is distilled: a small connector maps it to the
teacher's embedding width, it is matched to the teacher's embedding (feature matching), and it is
passed through the teacher's frozen classifier, whose output must agree with the teacher's own
logits (softmax regression). The classifier is reached through `kdlab.heads.through_classifier`:
the source's real head with its parameters detached, so the gradient reaches the connector and the
student only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.heads import classifier_in_features, through_classifier
from kdlab.knowledge.base import LossContext, checked_number
from kdlab.knowledge.feature import HintRegressor, as_map
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.models.weight_init import he_fan_out_init
from kdlab.taps import Outputs

SR_LOSSES = ("mse", "kl")


# Why SRD reads one layer of each model, for its error messages.
ONE_LAYER = "distils one representation, the one the teacher's classifier reads"


class SRD(LayerPairKnowledge):
    """Yang et al. 2021, "Knowledge Distillation via Softmax Regression Representation Learning"
    (ICLR), Sec. 3: L = L_CE + alpha * L_FM + beta * L_SR.

    h_S is the student's feature through a connector r (1x1 conv, no bias, + BatchNorm + ReLU, the
    authors' `transfer_conv`, He fan-out init) to the teacher's width, then globally averaged; h_T is
    the teacher's feature, globally averaged. L_FM = ||h_T - h_S||^2, and L_SR compares W_T h_S, the
    student's feature through the teacher's classifier, with W_T h_T, the teacher's logits. As in
    the authors' code (jingyang2017/KD_SRRL: `statm_loss` and `F.mse_loss(pred_sc, pred_t)`), both
    are mean squared errors, averaged over the batch and the features / classes (`sr_loss: mse`);
    `sr_loss: kl` is the softmax form instead, T^2 * KL(softmax(W_T h_T / T) || softmax(W_T h_S / T)),
    averaged over the batch.

    Layers: `embedding` (the pooled vector, read as a 1x1 map), as the CIFAR code of the SimKD
    benchmark (DefangChen/SimKD `SRRL`) does; a 4-D map (e.g. `last_stage`) goes through the
    connector before pooling, as the authors' ImageNet code does. The teacher's layer must be what
    its classifier reads (its width is the classifier's input width). The returned loss is
    feature_weight * L_FM + sr_weight * L_SR; `weight` scales the whole. Defaults: alpha = beta = 1
    and cross-entropy weight 1, the authors' code and the SimKD benchmark's SRRL run (which also adds
    KD: compose `knowledge=[srd,kd]` for that).

    kdlab differs from the anchors only where it must: the connector is built from the real shapes,
    and the teacher head used is whatever `kdlab.heads.classifier_of` finds (a peer's live head in
    online mode, detached).
    """

    key = "srd"

    def __init__(
        self,
        feature_weight: float = 1.0,
        sr_weight: float = 1.0,
        sr_loss: str = "mse",
        temperature: float = 1.0,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("embedding",),
        teacher_layers: str | Sequence[str] = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        self.feature_weight = checked_number(feature_weight, self.name, "feature_weight", 1, strict=False)
        self.sr_weight = checked_number(sr_weight, self.name, "sr_weight", 1, strict=False)
        if sr_loss not in SR_LOSSES:
            raise KdlabError(
                f"knowledge.{self.name}.sr_loss={sr_loss!r} is not one of {', '.join(SR_LOSSES)}: 'mse' "
                "compares the logits the teacher's classifier gives the student's feature with the "
                "teacher's logits by mean squared error (the authors' code), 'kl' their softmaxes at "
                f"knowledge.{self.name}.temperature. Set knowledge.{self.name}.sr_loss=mse."
            )
        self.sr_loss = sr_loss
        self.temperature = checked_number(
            temperature, self.name, "temperature", 1, why="it divides the logits"
        )
        self.check_one_layer(ONE_LAYER, "embedding")

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        s, t = self.one_pair(student, source, ONE_LAYER, "embedding")
        for side, x in (("student", s), ("teacher", t)):
            if x.ndim not in (2, 4):
                layer = (self.student_layers if side == "student" else self.teacher_layers)[0]
                raise KdlabError(
                    f"SRD reads a (batch, channels) embedding or a (batch, channels, height, width) map, but "
                    f"the {side}'s layer '{layer}' gives shape {tuple(x.shape)}. Set "
                    f"knowledge.{self.name}.{side}_layers=[embedding]."
                )
        if source.model is None:
            raise KdlabError(
                f"knowledge.{self.name} (SRD) passes the student's feature through the source model's "
                "classifier, but this scheme's source carries no model: its outputs come from an "
                "auxiliary exit (mode=byot), an ensemble or stored predictions, whose classifier kdlab "
                "cannot reach. Use SRD with a frozen teacher (mode=offline) or peers (mode=online, "
                "mode.target=peers)."
            )
        width = classifier_in_features(source.model, f"knowledge.{self.name} (SRD)")
        if t.shape[1] != width:
            raise KdlabError(
                f"SRD compares the student's feature with the teacher's '{self.teacher_layers[0]}' "
                f"({t.shape[1]} channels) and passes it through the teacher's classifier, which reads "
                f"{width} features, so that layer is not what the classifier reads. Set "
                f"knowledge.{self.name}.teacher_layers=[embedding] (the pooled feature the classifier reads)."
            )
        self.connector = HintRegressor(s.shape[1], t.shape[1]).to(device=s.device, dtype=s.dtype)
        he_fan_out_init(self.connector)  # the authors' transfer_conv init: N(0, 2 / out_channels)

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        ((s, t),) = self.pairs(student, source)
        h_s = self.connector(as_map(s)).mean(dim=(2, 3))
        h_t = as_map(t).to(h_s.dtype).mean(dim=(2, 3))
        feature_matching = F.mse_loss(h_s, h_t)
        z_s = through_classifier(source.model, h_s, f"knowledge.{self.name} (SRD)")
        z_t = source.logits.detach().to(z_s.dtype)
        if self.sr_loss == "mse":
            regression = F.mse_loss(z_s, z_t)
        else:
            T = self.temperature
            log_q = F.log_softmax(z_s / T, dim=1)
            regression = F.kl_div(log_q, F.softmax(z_t / T, dim=1), reduction="batchmean") * T**2
        return self.feature_weight * feature_matching + self.sr_weight * regression
