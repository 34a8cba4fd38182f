"""Teacher-free Knowledge Distillation (`mode=tfkd`): a hand-made teacher, or the student's trained self.

Yuan et al. 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR).
`mode.variant=reg` (Tf-KD_reg) distils from a virtual teacher built from the label alone;
`mode.variant=self` (Tf-KD_self) distils from a copy of the student's architecture trained first on
its own, kept in the teacher store like Born-Again's generation 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.cskd import mode_number, refuse_knowledge
from kdlab.schemes.offline import Offline
from kdlab.schemes.student import StudentScheme

# The authors' CIFAR-100 ResNet18 recipes (github:yuanli2333/Teacher-free-Knowledge-Distillation,
# experiments/base_experiments/base_resnet18 and kd_experiments/resnet18_distill/resnet18_self_teacher).
RECIPES = {
    "reg": {"temperature": 20.0, "alpha": 0.1, "multiplier": 100.0},
    "self": {"temperature": 6.0, "alpha": 0.95, "multiplier": 50.0},
}
OWN_LOSS = "(1 - alpha) * cross-entropy + alpha * the KL to its teacher"


def checked_variant(variant: object) -> str:
    if variant not in RECIPES:
        raise KdlabError(
            f"mode.variant={variant!r} is not a Tf-KD variant. Set mode.variant=reg (the hand-made "
            "virtual teacher, Tf-KD_reg) or mode.variant=self (a pre-trained copy of the student teaches "
            "it, Tf-KD_self)."
        )
    return str(variant)


def virtual_teacher(
    target: Tensor,
    num_classes: int,
    correct_prob: float,
    temperature: float,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Tf-KD_reg's teacher: p^d(k) = a for the true class, (1 - a)/(K - 1) for the others,
    softened as the authors' code does, softmax(p^d / T) (the temperature divides the probabilities)."""
    rest = (1.0 - correct_prob) / (num_classes - 1)
    p = torch.full((len(target), num_classes), rest, dtype=dtype, device=target.device)
    p.scatter_(1, target[:, None], correct_prob)
    return F.softmax(p / temperature, dim=1)


def tfkd_reg_term(
    logits: Tensor, target: Tensor, correct_prob: float, temperature: float, multiplier: float
) -> Tensor:
    """Tf-KD_reg's regulariser, as the authors compute it: multiplier * KL(softmax(p^d/T) || softmax(z)) / K.

    The student's softmax is at T = 1 and there is no T^2 (the authors' loss_kd_regularization; the
    paper's L_reg writes a softened student, p_tau). nn.KLDivLoss's default "mean" there averages over classes
    as well as samples, hence / K: with K = 100 and multiplier 100 (their ResNet18 recipe) it is the
    per-sample KL.
    """
    # At least float32: under bf16/fp16 autocast the logits are half precision, the teacher need not be.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    teacher = virtual_teacher(target, logits.shape[1], correct_prob, temperature, dtype)
    kl = F.kl_div(F.log_softmax(logits, dim=1), teacher, reduction="batchmean")
    return multiplier * kl / logits.shape[1]


def tfkd_self_term(logits: Tensor, teacher_logits: Tensor, temperature: float, multiplier: float) -> Tensor:
    """Tf-KD_self's distillation term: multiplier * T^2 * KL(softmax(t/T) || softmax(z/T)) / K (the KD loss
    with the pre-trained copy as teacher, as the authors' loss_kd_self computes it: their nn.KLDivLoss
    "mean" also averages over the K classes)."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p, target, reduction="batchmean")
    return multiplier * temperature**2 * kl / logits.shape[1]


class TfKD(StudentScheme):
    """Teacher-free KD (Yuan et al. 2020, Sec. 5): L = (1 - alpha) * CE(z, y) + alpha * D.

    `variant=reg` (Tf-KD_reg, this class): D is the KL from a virtual teacher built from the label,
    p^d = a on the true class and (1 - a)/(K - 1) elsewhere, a = `correct_prob` (the paper's L_reg);
    see `tfkd_reg_term`. `variant=self` (Tf-KD_self, `TfKDSelf`, which `TfKD(variant="self", ...)`
    builds): D is KD from a copy of the student's architecture trained on its own first; see
    `tfkd_self_term`.

    Null hyper-parameters take the variant's recipe, the authors' CIFAR-100 ResNet18 settings:
    reg T = 20, alpha = 0.1, multiplier 100; self T = 6, alpha = 0.95, multiplier 50; a = 0.99.

    Where kdlab knowingly follows the code (github:yuanli2333/Teacher-free-Knowledge-Distillation,
    my_loss_function.py) rather than the paper's equations: the KL is averaged over classes as well
    as samples and scaled by `multiplier` (nn.KLDivLoss's "mean"; the published recipes are tuned to
    it), and in Tf-KD_reg the temperature softens p^d itself, softmax(p^d / T), while the student
    stays at T = 1 with no T^2. So the published settings give the published losses.

    Knowledge terms are refused: the loss is the scheme's own.

    Args:
        variant: reg or self.
        temperature: T (null: the variant's recipe).
        alpha: the weight of the distillation term; the cross-entropy gets 1 - alpha (null: recipe).
        multiplier: the authors' extra factor on the KL (null: recipe).
        correct_prob: a, the virtual teacher's probability of the true class (reg only).
    """

    name = "tfkd"
    tasks = ("image",)  # its virtual teacher is a distribution over one label per image

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """Nothing for reg; for self, the student's architecture trained on its own, from the store."""
        refuse_knowledge(cfg.get("knowledge") or {}, "tfkd", OWN_LOSS)
        if checked_variant(cfg.mode.get("variant", "reg")) == "reg":
            return Sources()
        # Generation 0 of Born-Again's chain: the student's architecture trained alone (shared store entry).
        teacher, _, record = store.generations(cfg, datamodule, 1)
        return Sources(
            modules={"teacher": teacher},
            architectures={"teacher": cfg.student.name},
            frozen=record,
            frozen_config=cfg.student,
        )

    def __new__(cls, *args, variant: str = "reg", **kwargs):
        # One config (`mode.variant`) picks the class: the self variant distils from a frozen teacher,
        # which Offline's machinery serves (teacher-output cache, agreement metrics, the teacher's row).
        if cls is TfKD and checked_variant(variant) == "self":
            cls = TfKDSelf
        return super().__new__(cls)

    def __init__(
        self,
        *args,
        variant: str = "reg",
        temperature: float | None = None,
        alpha: float | None = None,
        multiplier: float | None = None,
        correct_prob: float = 0.99,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.variant = checked_variant(variant)
        recipe = RECIPES[self.variant]
        refuse_knowledge(self.templates, "tfkd", OWN_LOSS)
        pick = lambda value, key: recipe[key] if value is None else value  # noqa: E731
        self.temperature = mode_number(pick(temperature, "temperature"), "temperature", recipe["temperature"])
        self.alpha = mode_number(pick(alpha, "alpha"), "alpha", recipe["alpha"], strict=False, maximum=1.0)
        self.multiplier = mode_number(
            pick(multiplier, "multiplier"), "multiplier", recipe["multiplier"], strict=False
        )
        self.correct_prob = mode_number(
            correct_prob, "correct_prob", 0.99, strict=False, maximum=1.0, why="a probability"
        )
        if self.num_classes < 2:
            raise KdlabError(
                f"mode=tfkd spreads the virtual teacher's 1 - a over the other classes, but data.num_classes="
                f"{self.num_classes}. Use data with at least two classes."
            )
        # The cross-entropy's weight, as DOT and the logs read it.
        self.task_weight = 1.0 - self.alpha
        if not isinstance(self, Offline):
            self.prepare()  # Offline prepares once its teacher is attached

    def distillation(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """D of the loss, unweighted: the KL from the virtual teacher (Tf-KD_reg)."""
        return tfkd_reg_term(logits, batch["target"], self.correct_prob, self.temperature, self.multiplier)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.student_tap(batch["input"]).logits
        terms = {"task": F.cross_entropy(logits, batch["target"]), "tfkd": self.distillation(logits, batch)}
        loss = self.task_weight * terms["task"] + self.alpha * terms["tfkd"]
        self.log_terms(terms, loss)
        return self.loss_to_backpropagate(loss, self.task_weight * terms["task"])


class TfKDSelf(Offline, TfKD):
    """Tf-KD_self (Yuan et al. 2020, Sec. 5): a pre-trained copy of the student teaches it by KD.

    Built by `TfKD(variant="self", teacher=...)`; the teacher comes from `TfKD.sources_for` (the teacher
    store's generation 0 of the student's architecture), frozen and served like Offline's.
    """

    name = "tfkd"  # not Offline's, which comes first in the order of bases
    sources_for = TfKD.sources_for

    def __init__(self, *args, teacher: nn.Module | None = None, **kwargs):
        if teacher is None:
            raise KdlabError(
                "mode=tfkd with mode.variant=self distils from a pre-trained copy of the student, which "
                "TfKD.sources_for obtains from the teacher store, but the scheme got no teacher. Build it "
                "through kdlab.build (or kdlab.run), or pass teacher=<the trained student architecture>."
            )
        kwargs.setdefault("variant", "self")
        super().__init__(teacher, *args, **kwargs)

    def distillation(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """D of the loss, unweighted: KD from the frozen pre-trained copy (Tf-KD_self)."""
        teacher = self.sources(batch["input"], batch).logits
        return tfkd_self_term(logits, teacher, self.temperature, self.multiplier)
