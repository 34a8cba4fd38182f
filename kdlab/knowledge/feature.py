"""Feature-based knowledge: what the teacher's intermediate feature maps look like.

Every loss here reads pairs of layers: `student_layers[i]` is compared with `teacher_layers[i]`
(after "stages"/"last_stage" were expanded for each model). Losses that need a learnable adapter
(FitNets' regressor, VID's variational regressor) create it in `build()` from the real shapes of
the scheme's dry forward pass, so one config fits any pair of models. Where the two maps of a pair
have different spatial sizes, the larger one is average-pooled (adaptive) down to the smaller one,
as the CRD benchmark code does for AT, NST and VID.

A loss over several layer pairs sums the per-pair losses, as both the papers (AT Eq. 2, NST, VID)
and the CRD benchmark code (`loss_kd = sum(loss_group)`) do, so the benchmark weights apply
unchanged; `layer_reduction: mean` averages them instead. The source's features are detached here
as well, so no gradient can reach a teacher or peer through these losses whatever the scheme.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import LossContext, checked_number
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs


# --------------------------------------------------------------------------- shared helpers
def pool_to_common_size(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps down to the smaller's H and W.

    Each spatial dimension is handled on its own, so a map may be pooled in height only. Pooling
    never invents detail (unlike upsampling the smaller map), which is why CRD chose it.
    """
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def as_map(x: Tensor) -> Tensor:
    """A (B, C) vector as a (B, C, 1, 1) map, so 1x1-conv adapters also read embeddings."""
    return x[:, :, None, None] if x.ndim == 2 else x


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = log(1 + e^x) = y, written as y + log(1 - e^-y) so large y cannot overflow."""
    return y + math.log(-math.expm1(-y))


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


class FeatureKnowledge(LayerPairKnowledge):
    """Base of the feature losses: checks each pair's shapes at build time and builds adapters.

    Subclasses set `key` (the config name used in messages), implement `pair_loss`, and may
    override `check_pair` (raise on shapes they cannot handle) and `build_pairs` (create adapters).
    """

    key = "feature"
    #: what the method needs to compare, for error messages
    accepts = "feature maps"

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        feats = self.pairs(student, source)
        for index, (s, t) in enumerate(feats):
            self.check_pair(index, s, t)
        self.build_pairs(feats)

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        """Raise a KdlabError if this pair cannot be compared (default: 4-D maps, >1 common position)."""
        self.require_maps(index, s, t, allow_vectors=False)
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        if size[0] * size[1] < 2:
            # One position: every normalised map is the same constant, so the loss could never move.
            raise KdlabError(
                f"{type(self).__name__} compares {self.accepts} over spatial positions, but the pair "
                f"'{self.student_layers[index]}' {_shape(s)} / '{self.teacher_layers[index]}' {_shape(t)} "
                f"has a single common position ({size[0]}x{size[1]}), so the loss would be constant. Pick "
                f"earlier layers with larger maps for knowledge.{self.name}.student_layers/teacher_layers "
                "(e.g. [stages])."
            )

    def build_pairs(self, feats: list[tuple[Tensor, Tensor]]) -> None:
        """Create adapters from the real features (nothing to build by default)."""

    def require_maps(self, index: int, s: Tensor, t: Tensor, allow_vectors: bool) -> None:
        """Both features must be (B, C, H, W) maps, or also (B, C) vectors if `allow_vectors`."""
        ok = (4, 2) if allow_vectors else (4,)
        for side, x in (("student", s), ("teacher", t)):
            if x.ndim not in ok:
                layer = (self.student_layers if side == "student" else self.teacher_layers)[index]
                wanted = "(batch, channels, height, width) maps" + (
                    " or (batch, channels) vectors" if allow_vectors else ""
                )
                raise KdlabError(
                    f"{type(self).__name__} compares {self.accepts}, so it needs {wanted}, but the "
                    f"{side}'s layer '{layer}' gives shape {_shape(x)}. Pick a convolutional layer for "
                    f"knowledge.{self.name}.{side}_layers instead (e.g. [stages], [last_stage] or stage2)."
                )


# ---------------------------------------------------------------------------------- FitNets
class HintRegressor(nn.Module):
    """FitNets' regressor r(.): 1x1 conv (C_s -> C_t, no bias: BN follows) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        # The paper gives r the non-linearity of the guided layer; kdlab's taps are post-ReLU.
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class FitNet(FeatureKnowledge):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", Eq. 3 (the hint loss).

    L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2, where u_h is the teacher's hint layer, v_g the student's
    guided layer and r a learned regressor. As in the CRD benchmark (RepDistiller `HintLoss`), the
    squared error is averaged over all elements (batch, channels, positions) instead of halved and
    summed, and the hint is trained jointly with the task, in one stage, instead of the paper's
    separate hint-pretraining stage.

    Regressor: the paper's convolutional regressor has kernel size N_g - N_h + 1, i.e. 1x1 when the
    two maps have the same size, which is also CRD's `ConvReg` in that case; so r is a 1x1 conv
    (C_s -> C_t) + BatchNorm + ReLU (CRD's ConvReg order; ReLU because the paper gives r the guided
    layer's non-linearity). `relu: auto` keeps it, except on a language model's hidden states (read as a
    column of positions: kdlab.knowledge.layouts), which are signed: there r is a per-token linear
    projection with a BatchNorm, TinyBERT's hidden-state loss (Jiao et al. 2020, Eq. 8). true or false
    forces it (false for pre-activation taps).
    Where the spatial sizes differ, the larger map is adaptive-average-pooled to the smaller one (CRD
    uses a strided or transposed conv there instead; pooling handles any ratio). (B, C) vectors are
    read as 1x1 maps. Defaults (CRD benchmark): hint on stage2 of both models (`hint_layer=2`), weight 100,
    cross-entropy weight 1.
    """

    key = "fitnet"
    accepts = "feature maps through a learned regressor"

    def __init__(
        self,
        weight: float = 100.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stage2",),
        teacher_layers: str | Sequence[str] = ("stage2",),
        relu: bool | str = "auto",
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)
        if relu not in (True, False, "auto"):
            raise KdlabError(
                f"knowledge.{self.name}.relu={relu!r} is not a choice: auto (ReLU, except on a language "
                "model's hidden states), true or false."
            )
        self.relu = relu
        self._sequence_hint = False  # the teacher's hint is a language model's hidden states (set by build)
        self.regressors = nn.ModuleList()

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        self.require_maps(index, s, t, allow_vectors=True)

    def build_pairs(self, feats: list[tuple[Tensor, Tensor]]) -> None:
        self.regressors = nn.ModuleList(
            HintRegressor(s.shape[1], t.shape[1], self._relu()).to(device=s.device, dtype=s.dtype)
            for s, t in feats
        )

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        self._sequence_hint = bool(getattr(source.model, "sequence_features", False))
        super().build(student, source, context)

    def _relu(self) -> bool:
        return not self._sequence_hint if self.relu == "auto" else self.relu

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        s, t = pool_to_common_size(as_map(s), as_map(t))
        return F.mse_loss(self.regressors[index](s), t)


# ------------------------------------------------------------------------ attention transfer
def attention_map(f: Tensor, p: float) -> Tensor:
    """Q = mean_c |F_c|^p, flattened to (B, H*W) and L2-normalised per sample (Q / ||Q||_2)."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AT(FeatureKnowledge):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the Performance
    of Convolutional Neural Networks via Attention Transfer", Sec. 3.1, Eq. 2.

    The activation-based spatial attention map of a (C, H, W) map F is F^p_sum = sum_c |F_c|^p; the
    loss is beta/2 * sum_j || Q_S^j/||Q_S^j||_2 - Q_T^j/||Q_T^j||_2 ||_2 over the layer pairs j.
    Implemented as the authors' and the CRD benchmark code do (RepDistiller `Attention`,
    `(at(f_s) - at(f_t)).pow(2).mean()`): Q = mean over channels of |F|^p (the mean instead of the
    sum changes nothing after normalisation), flattened to H*W values and L2-normalised per
    sample; per pair, the squared difference of the normalised maps is averaged over batch and
    positions; pairs are summed (CRD's `sum(loss_group)`; `layer_reduction: mean` averages).
    The maps are compared position by position, so a permutation of channels changes nothing, and
    the channel counts may differ; the larger spatial map is adaptive-average-pooled to the
    smaller first. Defaults (CRD benchmark): p=2, every stage, weight 1000 (the paper's beta,
    "divided by the number of elements in the attention map and batch size"), cross-entropy 1.
    """

    key = "at"
    accepts = "attention maps"

    def __init__(
        self,
        p: float = 2.0,
        weight: float = 1000.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages",),
        teacher_layers: str | Sequence[str] = ("stages",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)
        self.p = checked_number(p, self.name, "p", 2, why="the paper uses p=2")

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        s, t = pool_to_common_size(s, t)
        return (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()


# ------------------------------------------------------------- neuron selectivity transfer
def channel_vectors(f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H*W), each channel's activation vector L2-normalised."""
    return F.normalize(f.flatten(2), dim=2)


class NST(FeatureKnowledge):
    """Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    Sec. 3 (the squared-MMD loss with the polynomial kernel).

    Each channel's activation vector over the H*W positions is one sample of the layer's
    distribution of neuron selectivity patterns, L2-normalised (f^k / ||f^k||_2). With
    k(x, y) = (x.y + c)^d the loss is the squared maximum mean discrepancy
        MMD^2 = 1/C_T^2 sum_{i,i'} k(t_i, t_i') + 1/C_S^2 sum_{j,j'} k(s_j, s_j')
                - 2/(C_S C_T) sum_{i,j} k(s_j, t_i),
    computed per sample and averaged over the batch, as the CRD code does (RepDistiller `NSTLoss`,
    full loss, d=2, c=0); pairs are summed. The channel counts may differ; the spatial sizes must
    match, so the larger map is adaptive-average-pooled to the smaller first. The paper's lambda/2
    factor is folded into the weight. Defaults (CRD benchmark): d=2, c=0, every stage, weight 50,
    cross-entropy weight 1.
    """

    key = "nst"
    accepts = "distributions of per-channel activation patterns"

    def __init__(
        self,
        degree: int = 2,
        c: float = 0.0,
        weight: float = 50.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages",),
        teacher_layers: str | Sequence[str] = ("stages",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise KdlabError(
                f"NST: degree={degree!r} must be a whole number >= 1 (the polynomial kernel's power). "
                f"The paper uses knowledge.{self.name}.degree=2."
            )
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise KdlabError(
                f"NST: c={c!r} must be a finite number >= 0 (the polynomial kernel's offset). "
                f"The paper uses knowledge.{self.name}.c=0."
            )
        self.degree, self.c = degree, float(c)

    def kernel_mean(self, a: Tensor, b: Tensor) -> Tensor:
        """mean over the batch and all (a_i, b_j) channel pairs of (a_i . b_j + c)^d."""
        return (torch.bmm(a, b.transpose(1, 2)) + self.c).pow(self.degree).mean()

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        s, t = (channel_vectors(x) for x in pool_to_common_size(s, t))
        return self.kernel_mean(s, s) + self.kernel_mean(t, t) - 2 * self.kernel_mean(s, t)


# --------------------------------------------------------------------------- cosine hint
class CosineHint(FeatureKnowledge):
    """The "cosine loss" on hidden representations of PyTorch's knowledge-distillation tutorial
    (https://pytorch.org/tutorials/beginner/knowledge_distillation_tutorial.html).

    Both features are flattened to vectors per sample; if the teacher's vector is k times longer
    than the student's, it is average-pooled with `avg_pool1d(kernel_size=k)` down to the
    student's length, as the tutorial does (2048 -> 1024 at CIFAR size); the loss is
    CosineEmbeddingLoss with target 1, i.e. 1 - mean over the batch of cos(s, t). A pair whose
    teacher length is not a multiple of the student's is refused. There are no learnable weights.
    Defaults (the tutorial): the last conv stage (its flattened conv output), hidden-representation
    weight 0.25 and cross-entropy weight 0.75.
    """

    key = "cosine"
    accepts = "flattened feature vectors"

    def __init__(
        self,
        weight: float = 0.25,
        task_weight: float = 0.75,
        student_layers: str | Sequence[str] = ("last_stage",),
        teacher_layers: str | Sequence[str] = ("last_stage",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        d_s, d_t = s[0].numel(), t[0].numel()
        if d_s == 0 or d_t % d_s != 0:
            raise KdlabError(
                f"CosineHint compares flattened features, average-pooling the teacher's vector down to "
                f"the student's length, so the teacher's length must be a multiple of the student's. "
                f"The student's '{self.student_layers[index]}' has {d_s} values per sample "
                f"{_shape(s)[1:]} and the teacher's '{self.teacher_layers[index]}' {d_t} {_shape(t)[1:]}, "
                f"which is not a multiple of {d_s}. Pick knowledge.{self.name}.student_layers/teacher_layers "
                "whose sizes divide (e.g. the tutorial's last conv stage of DeepNN (2048 values at 32 px) "
                "and LightNN (1024)), or use FitNets, whose regressor adapts any widths."
            )

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        s, t = s.flatten(1), t.flatten(1)
        ratio = t.shape[1] // s.shape[1]
        if ratio > 1:
            t = F.avg_pool1d(t.unsqueeze(1), kernel_size=ratio).squeeze(1)
        return F.cosine_embedding_loss(s, t, torch.ones(s.shape[0], device=s.device, dtype=s.dtype))


# ------------------------------------------------------------ variational info distillation
class VariationalRegressor(nn.Module):
    """VID's Gaussian q(t | s): mean mu(s) by three 1x1 convs, per-channel variance softplus(alpha)+eps."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, init_variance: float, eps: float):
        super().__init__()
        # No biases, as in the reference code.
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
        )
        # Start at sigma^2 = init_variance: a wide Gaussian, so early, poorly regressed targets
        # give small gradients instead of exploding ones.
        self.alpha = nn.Parameter(torch.full((out_channels,), inverse_softplus(init_variance - eps)))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.alpha) + self.eps


class VID(FeatureKnowledge):
    """Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer", Sec. 3.

    Maximises a variational lower bound of the mutual information between teacher and student
    features with a Gaussian q(t | s) whose mean mu(s) is a learned regressor and whose variance is
    one learned value per teacher channel, sigma_c^2 = log(1 + exp(alpha_c)) + eps. The loss is
    -log q(t | s) without constants, averaged over all elements (batch, channels, positions):
        L = mean 0.5 * (log sigma_c^2 + (t - mu(s))^2 / sigma_c^2),
    and pairs are summed. mu is 1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv with hidden width
    equal to the teacher's channels (`hidden_channels: null`), no biases; where the spatial sizes
    differ the larger map is adaptive-average-pooled to the smaller. (B, C) vectors are read as
    1x1 maps. Defaults (the authors' code as used in the CRD benchmark): initial sigma^2 = 5,
    eps = 1e-5, every stage, weight 1, cross-entropy weight 1.
    """

    key = "vid"
    accepts = "feature maps through a learned Gaussian regressor"

    def __init__(
        self,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("stages",),
        teacher_layers: str | Sequence[str] = ("stages",),
        hidden_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)
        self.eps = checked_number(eps, self.name, "eps", "1e-5", why="it keeps the variance positive")
        init_variance = checked_number(
            init_variance, self.name, "init_variance", 5, why="the reference starts at 5"
        )
        if init_variance <= self.eps:
            raise KdlabError(
                f"VID: init_variance={init_variance} must be larger than eps={self.eps}, since the variance "
                f"is softplus(alpha) + eps. Set knowledge.{self.name}.init_variance=5 (the reference value)."
            )
        if hidden_channels is not None and (
            isinstance(hidden_channels, bool) or not isinstance(hidden_channels, int) or hidden_channels < 1
        ):
            raise KdlabError(
                f"VID: hidden_channels={hidden_channels!r} must be a whole number >= 1, or null for the "
                f"teacher's channel count (the reference setting). Set knowledge.{self.name}.hidden_channels."
            )
        self.init_variance = init_variance
        self.hidden_channels = hidden_channels
        self.regressors = nn.ModuleList()

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        self.require_maps(index, s, t, allow_vectors=True)

    def build_pairs(self, feats: list[tuple[Tensor, Tensor]]) -> None:
        self.regressors = nn.ModuleList(
            VariationalRegressor(
                s.shape[1], t.shape[1], self.hidden_channels or t.shape[1], self.init_variance, self.eps
            ).to(device=s.device, dtype=s.dtype)
            for s, t in feats
        )

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        s, t = pool_to_common_size(as_map(s), as_map(t))
        regressor = self.regressors[index]
        variance = regressor.variance().view(1, -1, 1, 1)
        return (0.5 * (variance.log() + (t - regressor.mean(s)).pow(2) / variance)).mean()


# -------------------------------------------------------------------------- plain L2 hint
class FeatureL2(FeatureKnowledge):
    """The plain feature hint of Be Your Own Teacher (Zhang et al. 2019, Sec. 3.2): the squared
    L2 distance between a student feature map and the source's map of the same shape,
    || F_i - F_C ||_2^2, with no adapter.

    BYOT's auxiliary exits already map each shallow stage to the deepest stage's shape, so no
    regressor is needed (FitNets is the variant with one). Here the squared distance is averaged
    over elements (MSE), so the weight does not depend on the map size. The BYOT recipe weighs it
    0.03. Shapes must match exactly; otherwise use `fitnet`, which learns a regressor.
    """

    key = "l2"

    def __init__(
        self,
        weight: float = 0.03,
        task_weight: float = 1.0,
        student_layers: str | Sequence[str] = ("last_stage",),
        teacher_layers: str | Sequence[str] = ("last_stage",),
        layer_reduction: str = "sum",
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, layer_reduction, name=name)

    def check_pair(self, index: int, s: Tensor, t: Tensor) -> None:
        if s.shape != t.shape:
            raise KdlabError(
                f"FeatureL2 compares feature maps of equal shape, but the student's "
                f"'{self.student_layers[index]}' is {_shape(s)} and the teacher's "
                f"'{self.teacher_layers[index]}' {_shape(t)}. Use knowledge=fitnet, which learns a "
                "regressor between different shapes, or pick layers of equal shape."
            )

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        return F.mse_loss(s, t)
