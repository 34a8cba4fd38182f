"""Factor transfer (FT): the student learns the teacher's "factors", a paraphrase of its last map.

Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer"
(NeurIPS). A paraphraser (a convolutional autoencoder on the teacher's last-stage map, whose code
has k times the teacher's channels) is first trained, in a stage before the main fit, to
reconstruct that map; its encoder then gives the teacher's factors. In the main fit a translator
(three convolutions on the student's map) is trained with the student so that its output, the
student's factors, matches the teacher's after L2 normalisation, in the L1 distance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.ab import checked_lr
from kdlab.knowledge.base import LossContext, Stage, checked_epochs, checked_number
from kdlab.knowledge.feature import pool_to_common_size
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs


def conv_block(conv: nn.Module, channels: int, batch_norm: bool) -> list[nn.Module]:
    """A 3x3 (transposed) convolution, BatchNorm if asked, and the references' LeakyReLU(0.1)."""
    return [conv, *([nn.BatchNorm2d(channels)] if batch_norm else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """The references' paraphraser: encoder C -> C -> kC -> kC, decoder kC -> kC -> C -> C (3x3, stride 1)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels

        def conv(i: int, o: int) -> list[nn.Module]:
            return conv_block(nn.Conv2d(i, o, 3, padding=1), o, False)

        def deconv(i: int, o: int) -> list[nn.Module]:
            return conv_block(nn.ConvTranspose2d(i, o, 3, padding=1), o, False)

        self.encoder = nn.Sequential(*conv(c, c), *conv(c, k), *conv(k, k))
        self.decoder = nn.Sequential(*deconv(k, k), *deconv(k, c), *deconv(c, c))

    def forward(self, x: Tensor, decode: bool = True) -> Tensor:
        factor = self.encoder(x)
        return self.decoder(factor) if decode else factor


class Translator(nn.Sequential):
    """The student's translator: C_s -> C_s -> kC_t -> kC_t, 3x3 convolutions (+ BatchNorm) + LeakyReLU."""

    def __init__(self, channels: int, factor_channels: int, batch_norm: bool = True):
        c, k, bias = channels, factor_channels, not batch_norm  # a bias before BatchNorm would cancel out
        super().__init__(
            *conv_block(nn.Conv2d(c, c, 3, padding=1, bias=bias), c, batch_norm),
            *conv_block(nn.Conv2d(c, k, 3, padding=1, bias=bias), k, batch_norm),
            *conv_block(nn.Conv2d(k, k, 3, padding=1, bias=bias), k, batch_norm),
        )


def factor_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """|| F_S/||F_S||_2 - F_T/||F_T||_2 ||_1 per sample, as a mean over every element of the batch.

    Each factor is flattened whole (channels and positions) before normalising; the larger of two
    spatial sizes is average-pooled to the smaller first.
    """
    s, t = pool_to_common_size(student_factor, teacher_factor)
    return F.l1_loss(F.normalize(s.flatten(1)), F.normalize(t.flatten(1)))


class FT(LayerPairKnowledge):
    """Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer" (NeurIPS), Sec. 3: the paraphraser's reconstruction loss, then the FT loss.

    Stage "paraphraser" (`init_epochs` epochs at `init_lr`, before the main fit): the paraphraser P
    (encoder E, decoder D, E's output has int(k C_t) channels, k = `rate`) is trained alone on the
    teacher's map x, with the reconstruction loss mean((D(E(x)) - x)^2). Main fit: the translator T
    is trained with the student, and the paraphraser stays fixed:

        L_FT = mean_j | F_S/||F_S||_2 - F_T/||F_T||_2 |_j,   F_S = vec T(s), F_T = vec E(x)   (p = 1)

    i.e. the paper's L1 distance of the L2-normalised, flattened factors, divided by their size,
    as the authors' code (utils.FT + nn.L1Loss) and torchdistill's FTLoss(p=1) compute it.

    The paraphraser is trained by the stage only (`stage_only_modules`): the main fit keeps it fixed
    and runs its encoder under no_grad.

    Recipe (conf/knowledge/ft.yaml): RepDistiller's CIFAR-100 one (init_epochs 30, MSE
    reconstruction, k = 0.5, translator with BatchNorm, no KD term), but with the weight of the
    authors' code (beta 500), which goes with this loss: RepDistiller's beta 200 goes with its own
    factor loss (see below), whose values are about sqrt(k C_t) times larger. The stage runs the
    run's optimizer at its lr by default (`init_lr` null): RepDistiller's 0.01 is an SGD rate
    (init_lr=0.01 with optimizer=sgd reproduces it), at which Adam makes the paraphraser diverge.

    Where kdlab differs from the references: RepDistiller's FactorTransfer first reduces each factor
    to a spatial map (the channel mean of its squares, as attention transfer does) and normalises
    that; kdlab follows the paper, the authors' code and torchdistill (the whole factor). The
    authors' code trains the paraphraser with an L1 reconstruction loss at lr 0.1 for 5 epochs and
    has no BatchNorm in the translator (set translator_bn=false for that); kdlab follows RepDistiller
    there, but without the convolutions' biases before BatchNorm, which it cancels. Factor maps of
    different spatial sizes are pooled to the smaller, as RepDistiller does.
    """

    key = "ft"

    def __init__(
        self,
        weight: float = 500.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("last_stage",),
        teacher_layers: str | Sequence[str] = ("last_stage",),
        rate: float = 0.5,
        translator_bn: bool = True,
        init_epochs: int = 30,
        init_lr: float | None = None,
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, "sum", name=name)
        self.rate = checked_number(
            rate, self.name, "rate", 0.5, why="the paraphrase rate k: factor channels / teacher channels"
        )
        if not isinstance(translator_bn, bool):
            raise KdlabError(
                f"knowledge.{self.name}.translator_bn={translator_bn!r}: it says whether the translator has "
                f"BatchNorm and must be true or false, e.g. knowledge.{self.name}.translator_bn=true "
                "(RepDistiller's)."
            )
        self.translator_bn = translator_bn
        self.init_epochs = checked_epochs(init_epochs, self.name)
        self.init_lr = checked_lr(init_lr, self.name)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    # --------------------------------------------------------------------------- building
    def maps(self, student: Outputs, source: Outputs) -> tuple[Tensor, Tensor]:
        """The student's map and the teacher's (detached): one pair of 4-D maps."""
        s, t = self.one_pair(
            student, source, "paraphrases one layer of the teacher (the paper's last group)", "last_stage"
        )
        for side, name, x in (("student", self.student_layers[0], s), ("teacher", self.teacher_layers[0], t)):
            if x.ndim != 4:
                raise KdlabError(
                    f"knowledge.{self.name} (FT) convolves feature maps, (batch, channels, height, width), "
                    f"but the {side}'s layer '{name}' gives shape {tuple(x.shape)}. Set "
                    f"knowledge.{self.name}.{side}_layers to a convolutional stage, e.g. [last_stage]."
                )
        return s, t

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        s, t = self.maps(student, source)
        factor_channels = int(t.shape[1] * self.rate)  # int(), as RepDistiller and torchdistill
        if factor_channels < 1:
            raise KdlabError(
                f"knowledge.{self.name}.rate={self.rate:g}: the factors would have "
                f"int({t.shape[1]} x {self.rate:g}) = {factor_channels} channels (the teacher's "
                f"'{self.teacher_layers[0]}' has {t.shape[1]}). Use a rate of at least {1 / t.shape[1]:.3g}, "
                f"e.g. knowledge.{self.name}.rate=0.5 (the paper's)."
            )
        like = {"device": t.device, "dtype": t.dtype}
        self.paraphraser = Paraphraser(t.shape[1], factor_channels).to(**like)
        self.translator = Translator(s.shape[1], factor_channels, self.translator_bn).to(
            device=s.device, dtype=s.dtype
        )

    def _built(self) -> tuple[Paraphraser, Translator]:
        if self.paraphraser is None or self.translator is None:
            raise KdlabError(
                f"knowledge.{self.name} (FT) builds its paraphraser and translator from the real feature "
                "shapes: call build() before the first forward (a scheme does this)."
            )
        return self.paraphraser, self.translator

    # ------------------------------------------------------------------------------ loss
    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        paraphraser, translator = self._built()
        s, t = self.maps(student, source)
        with torch.no_grad():  # fixed in the main fit
            teacher_factor = paraphraser(t, decode=False)
        return factor_loss(translator(s), teacher_factor)

    # ------------------------------------------------------------- the paraphraser's stage
    def stages(self) -> list[Stage]:
        return [Stage("paraphraser", epochs=self.init_epochs, trains_student=False, lr=self.init_lr)]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        paraphraser, _ = self._built()
        return [paraphraser]

    def stage_only_modules(self) -> list[nn.Module]:
        return [self.paraphraser] if self.paraphraser is not None else []

    def stage_loss(
        self,
        stage: str,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        paraphraser, _ = self._built()
        _, t = self.maps(student, source)
        return F.mse_loss(paraphraser(t), t)
