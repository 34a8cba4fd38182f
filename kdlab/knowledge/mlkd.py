"""Multi-level logit distillation (MLKD): the teacher's predictions matched per sample, across the
batch and across the classes, at several temperatures, on a weak and a strong view of each sample.

Jin, Wang & Lin 2023, "Multi-Level Logit Distillation" (CVPR). It reads logits only, so it fits any
model pair with the same classes; it declares the extra view "strong", so the data carries a
RandAugment'ed copy of each training image and the scheme runs both models on it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.knowledge.base import Knowledge, LossContext, checked_number
from kdlab.knowledge.response import standardized
from kdlab.taps import Outputs

STRONG = "strong"


class MLKD(Knowledge):
    """Jin et al. 2023, "Multi-Level Logit Distillation" (CVPR), Sec. 3.

    Prediction augmentation: each model's logits z give one prediction per temperature T,
    p(T) = softmax(z / T). Three alignments compare the teacher's predictions with the student's:

    - instance level (Hinton's KD at each T): L_ins(T) = T^2 * KL(p_t(T) || p_s(T)), batch-averaged;
    - batch level (input correlation): the B x B Gram matrix G = p(T) p(T)^T of the batch's
      predictions, L_batch(T) = ||G_t - G_s||_F^2 / B;
    - class level (category correlation): the C x C matrix M = p(T)^T p(T),
      L_class(T) = ||M_t - M_s||_F^2 / C.

    The loss is the sum over temperatures of all three, plus the instance term on the strong view.
    Exactly as in the authors' code (github.com/Jin-Ying/Multi-Level-Logit-Distillation, commit
    5ee473f, mdistiller/distillers/KD_ours.py), which this reproduces term by term:

    - `temperatures` (4, 3, 5, 2, 6: the base cfg.KD.TEMPERATURE, then the fixed ones): the
      instance, batch and class terms on the weak view (the batch's normal `input`);
    - `strong_temperatures` (4, 3, 5): the instance term on the strong view;
    - `weak_unmasked_temperatures` (2, 6): the reference's strong-view instance sum reads the *weak*
      view at its last two temperatures, without a mask; kept so the numbers match;
    - confidence masking: with the teacher's weak-view softmax at T=1, a sample is kept when its
      top probability is at most the batch's `confidence_percentile`-th percentile (the median),
      and a class when its summed probability over the batch is at most that percentile of the
      classes'. The reference multiplies each batch-averaged term by its mask and averages, so a
      mask acts as the *share* of samples (of classes, for the class term) it keeps (about one
      half), not as a per-sample selection; kdlab computes that same share. The weak-view
      instance and batch terms take the sample share, the class term the class share;
    - the reference's strong-view batch and class terms are computed but left out of its total,
      so they are not computed here;
    - the cross-entropy is on both views, each with weight 0.1 (CE 0.1, KD 0.9: mdistiller's KD
      defaults, which the reference's configs keep). kdlab's scheme adds the weak view's as the
      task loss (`task_weight`); this term adds the strong view's as
      `strong_task_weight / weight * CE`, so that `weight` x this term carries exactly
      `strong_task_weight` x CE(strong). With `weight: 0` it is left out with the rest.

    `logit_standardization: true` z-scores both models' logits per sample (`standardized`; Sun et
    al. 2024, "Logit Standardization in Knowledge Distillation", CVPR) in the instance-level terms
    only, as the authors' MLKD code does (github.com/sunshangquan/logit-standardization-KD, commit
    f6e5aa5, mdistiller/distillers/MLKD.py): the batch and class terms and the masks read the raw
    logits. Their recipe is the base temperature 2 and weight 9: temperatures [2,3,5,2,6],
    strong_temperatures [2,3,5], weight 9, with CE 0.1 on each view.

    Where kdlab differs from the reference: the percentile is torch.quantile's linear
    interpolation (numpy's in the reference), in the logits' precision (at least float32), which
    can only tip a sample exactly at the median; the scheme's task loss follows `mode.task_weight`
    when that is set, while `strong_task_weight` stays as configured; and the strong view is the
    data's `data.views.strong` (the usual augmentation + torchvision's RandAugment), where the
    reference uses its own FixMatch-style RandAugment(2, 10).
    """

    key = "mlkd"
    views = (STRONG,)

    def __init__(
        self,
        temperatures: Iterable[float] = (4.0, 3.0, 5.0, 2.0, 6.0),
        strong_temperatures: Iterable[float] = (4.0, 3.0, 5.0),
        weak_unmasked_temperatures: Iterable[float] = (2.0, 6.0),
        confidence_percentile: float = 50.0,
        strong_task_weight: float = 0.1,
        logit_standardization: bool = False,
        weight: float = 0.9,
        task_weight: float = 0.1,
        name: str | None = None,
    ):
        super().__init__(weight=weight, task_weight=task_weight, name=name)
        self.temperatures = self._temperatures(temperatures, "temperatures", "[4,3,5,2,6]", empty=False)
        self.strong_temperatures = self._temperatures(strong_temperatures, "strong_temperatures", "[4,3,5]")
        self.weak_unmasked_temperatures = self._temperatures(
            weak_unmasked_temperatures, "weak_unmasked_temperatures", "[2,6]"
        )
        self.confidence_percentile = checked_number(
            confidence_percentile, self.name, "confidence_percentile", 50, strict=False, why="a percentile"
        )
        if self.confidence_percentile > 100:
            raise KdlabError(
                f"knowledge.{self.name}.confidence_percentile={confidence_percentile!r}: it is a percentile "
                f"of the teacher's confidences, so it must lie in [0, 100]. Set it to e.g. "
                f"knowledge.{self.name}.confidence_percentile=50 (the reference's median)."
            )
        self.strong_task_weight = checked_number(
            strong_task_weight, self.name, "strong_task_weight", 0.1, strict=False
        )
        self.logit_standardization = bool(logit_standardization)

    def _temperatures(self, values: object, key: str, example: str, empty: bool = True) -> tuple[float, ...]:
        """The configured temperatures as floats, each a finite number > 0 (a clear error otherwise)."""
        iterable = not isinstance(values, str | bytes | Mapping) and hasattr(values, "__iter__")
        items = list(values) if iterable else []
        good = all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in items
        )
        if not iterable or not good or (not empty and not items):
            need = "a list" if empty else "a non-empty list"
            raise KdlabError(
                f"knowledge.{self.name}.{key}={items if iterable else values!r}: {key} must be {need} of "
                f"finite numbers > 0 (each divides the logits). Set it to such a list, e.g. "
                f"knowledge.{self.name}.{key}={example}."
            )
        return tuple(float(v) for v in items)

    # ------------------------------------------------------------------------------ views
    def strong_view(self, outputs: Outputs, side: str) -> Outputs:
        """The outputs on the strong view, or a KdlabError saying why they are missing."""
        view = outputs.views.get(STRONG)
        if view is None:
            has = ", ".join(map(repr, outputs.views)) or "none"
            raise KdlabError(
                f"knowledge.{self.name} (MLKD) compares the models on a weak and a strong view of each "
                f"sample, but the {side}'s outputs carry no {STRONG!r} view (views given: {has}). "
                f"mode=offline and mode=online run the models on the views a loss declares; "
                f"mode=byot (mode=self) compares the exits of one pass over the main input, and mode=pskd "
                f"teaches with its past predictions on the main input, so neither has a strong view for "
                f"MLKD to read: use mode=offline or mode=online. Called directly, pass "
                f"Outputs(logits, views={{'{STRONG}': Outputs(strong_logits)}})."
            )
        if view.logits.shape != outputs.logits.shape:
            raise KdlabError(
                f"knowledge.{self.name} (MLKD): the {side}'s logits on the {STRONG!r} view have shape "
                f"{tuple(view.logits.shape)}, on the main input {tuple(outputs.logits.shape)}; the views "
                f"must be the same samples. Check the data's views (data.views.{STRONG})."
            )
        return view

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        # Nothing to build; checking the views here makes a scheme without them fail at once.
        self.strong_view(student, "student")
        self.strong_view(source, "teacher")

    # ------------------------------------------------------------------------------- loss
    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        s_weak, t_weak = student.logits, source.logits.detach()
        s_strong = self.strong_view(student, "student").logits
        t_strong = self.strong_view(source, "teacher").logits.detach()
        sample_share, class_share = self.mask_shares(t_weak)

        # Instance level, on standardised logits with LS (Sun et al.'s MLKD applies it here only).
        ins_sw, ins_tw, ins_ss, ins_ts = s_weak, t_weak, s_strong, t_strong
        if self.logit_standardization:
            ins_sw, ins_tw, ins_ss, ins_ts = map(standardized, (s_weak, t_weak, s_strong, t_strong))
        loss = s_weak.new_zeros(())
        for T in self.temperatures:
            loss = loss + sample_share * instance_loss(ins_sw, ins_tw, T)
            loss = loss + sample_share * batch_loss(s_weak, t_weak, T)
            loss = loss + class_share * class_loss(s_weak, t_weak, T)
        for T in self.strong_temperatures:
            loss = loss + instance_loss(ins_ss, ins_ts, T)
        for T in self.weak_unmasked_temperatures:
            loss = loss + instance_loss(ins_sw, ins_tw, T)

        if self.strong_task_weight > 0 and self.weight > 0:
            if "target" not in batch:
                raise KdlabError(
                    f"knowledge.{self.name} (MLKD) adds the cross-entropy on the strong view "
                    f"(strong_task_weight={self.strong_task_weight:g}), so it needs the batch's labels "
                    f"(batch['target']), which this batch lacks. Pass them, or set "
                    f"knowledge.{self.name}.strong_task_weight=0."
                )
            ce = F.cross_entropy(s_strong, batch["target"])
            loss = loss + (self.strong_task_weight / self.weight) * ce
        return loss

    def mask_shares(self, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The share of samples, and of classes, that the reference's confidence masks keep.

        A sample is kept when the teacher's top probability (T=1, weak view) is at most the
        batch's percentile; a class when its probability summed over the batch is at most the
        classes' percentile. The reference applies each mask to an already batch-averaged loss,
        so only the share kept matters.
        """
        # torch.quantile takes float32/64 only (half-precision logits under mixed precision).
        p = F.softmax(teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)), dim=1)
        q = self.confidence_percentile / 100
        confidence = p.max(dim=1).values
        per_class = p.sum(dim=0)
        sample_share = (confidence <= torch.quantile(confidence, q)).to(p.dtype).mean()
        class_share = (per_class <= torch.quantile(per_class, q)).to(p.dtype).mean()
        return sample_share, class_share


def instance_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    log_q = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_q, F.softmax(teacher / temperature, dim=1), reduction="batchmean") * temperature**2


def batch_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """||p_t p_t^T - p_s p_s^T||_F^2 / B: the batch's sample-relation (Gram) matrices at T."""
    p_s, p_t = _probabilities(student, temperature), _probabilities(teacher, temperature)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / student.shape[0]


def class_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """||p_t^T p_t - p_s^T p_s||_F^2 / C: the class-correlation matrices over the batch at T."""
    p_s, p_t = _probabilities(student, temperature), _probabilities(teacher, temperature)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / student.shape[1]


def _probabilities(logits: Tensor, temperature: float) -> Tensor:
    """softmax(z / T) in float32 at least: the Gram matrices' differences are lost in bf16 (1-3 %)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.softmax(logits.to(dtype) / temperature, dim=1)
