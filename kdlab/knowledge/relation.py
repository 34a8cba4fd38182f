"""Relation-based knowledge: how the samples of a batch relate to each other, not each one alone.

Every loss here builds, for the student and for the teacher separately, a matrix of relations
(distances, angles, similarities, kernel correlations, or the "flow" between two layers of one
model) and compares the two. Relations between b samples form a b x b (or b x b x b) matrix
whatever the feature width, so the student's and the teacher's features need no adapter to be
compared (FSP, which relates channels, is the exception and needs equal widths).

The relations are computed in float32 with autocast off: the matrices are small, but their
losses carry large weights (SP 3000, PKT 30000), which would amplify half-precision rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.knowledge.base import LossContext, checked_number
from kdlab.knowledge.pairs import LayerPairKnowledge
from kdlab.taps import Outputs

Layers = tuple[str, ...] | list[str]


def _full_precision(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _LayerPairs(LayerPairKnowledge):
    """Relation losses: the shared pairing, with the relations computed in float32."""

    def pairs(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        return [(_full_precision(s), _full_precision(t)) for s, t in super().pairs(student, source)]

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        device = next(iter(student.feats.values())).device.type
        with torch.autocast(device, enabled=False):
            return super().forward(student, source, batch, context)


class RKD(_LayerPairs):
    """Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (CVPR), Sec. 3.2.

    On flattened features x (b x d), both models separately:
      distance-wise potential  psi_D(i, j) = ||x_i - x_j||_2 / mu, with mu the mean of
        ||x_i - x_j||_2 over the distinct pairs i != j of the batch (psi_D(i, i) = 0);
      angle-wise potential  psi_A(i, j, k) = <e_ij, e_kj>, e_ij = (x_i - x_j) / ||x_i - x_j||_2,
        the cosine of the angle at x_j of the triangle (x_i, x_j, x_k).
    L_D = mean over all b^2 ordered pairs of l(psi_D(s), psi_D(t)) and L_A = mean over all b^3
    ordered triplets of l(psi_A(s), psi_A(t)), with l the Huber loss at delta=1 (smooth-L1):
    l(x, y) = (x - y)^2 / 2 if |x - y| <= 1, else |x - y| - 1/2. Returned (unweighted by `weight`):
    distance_weight * L_D + angle_weight * L_A.

    Choices where the paper and the reference (RepDistiller) code differ, following the code:
    the paper sums over distinct pairs/triplets; here, as there, the mean runs over all b^2 pairs
    and b^3 triplets. The degenerate ones (i = j, or j = k: e = 0; i = k: cosine 1) are equal on
    both sides and add 0, so this is the paper's sum times a constant that the benchmark weights
    were tuned with. Distances are sqrt(max(||x_i - x_j||^2, 1e-12)) as in the reference code, so
    the gradient stays finite at coincident points; but the squared distances are summed from the
    explicit differences (the b x b x d tensor the angle term needs anyway), not expanded as
    ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j, which cancels badly in float32. Both potentials are scale
    invariant, so student and teacher features of any widths compare directly. A batch of one
    sample has no relations: the loss is 0.

    Defaults: CRD benchmark (RepDistiller's RKDLoss: w_d=25, w_a=50; `-b 1`; cross-entropy 1), on
    the penultimate embedding. Cost: a b x b x d tensor and b^3 cosines per model per step.
    """

    key = "rkd"

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        eps: float = 1e-12,
        weight: float = 1.0,
        task_weight: float = 1.0,
        student_layers: Layers = ("embedding",),
        teacher_layers: Layers = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)
        self.distance_weight = checked_number(distance_weight, self.name, "distance_weight", 25, strict=False)
        self.angle_weight = checked_number(angle_weight, self.name, "angle_weight", 50, strict=False)
        self.eps = checked_number(eps, self.name, "eps", "1e-12", strict=True)

    def geometry(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(psi_D: b x b normalised distances, psi_A: b x b x b cosines, [j, i, k] = angle at x_j)."""
        x = x.flatten(1)
        diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i - x_j
        dist = diff.pow(2).sum(-1).clamp_min(self.eps).sqrt()
        distinct = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        psi_d = torch.where(distinct, dist / dist[distinct].mean(), torch.zeros_like(dist))
        # On the diagonal diff is 0, so e_jj = 0 and the degenerate cosines are exactly 0.
        unit = diff / dist.unsqueeze(-1)
        psi_a = unit @ unit.transpose(1, 2)
        return psi_d, psi_a

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        if s.shape[0] < 2:
            return s.new_zeros(())
        s_d, s_a = self.geometry(s)
        t_d, t_a = self.geometry(t)
        loss = s.new_zeros(())
        # A zero weight skips its term (the angle term is the b^3 one).
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(s_d, t_d, beta=1.0)
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(s_a, t_a, beta=1.0)
        return loss


class SP(_LayerPairs):
    """Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV), Sec. 3.

    Q is a layer's activation flattened to b x (c*h*w); G~ = Q Q^T, and G is G~ with each row
    L2-normalised (row / max(||row||_2, 1e-12)). L_SP = (1/b^2) sum over the listed layer pairs
    (l, l') of ||G_T^(l) - G_S^(l')||_F^2: summed over pairs, as in both the paper and the
    reference code (`sum(loss_group)`). G is invariant to the order (and number) of channels, so
    student and teacher widths may differ.

    Defaults: CRD benchmark: the last stage's output (RepDistiller's feat[-2]), weight 3000,
    cross-entropy 1.
    """

    key = "sp"

    def __init__(
        self,
        weight: float = 3000.0,
        task_weight: float = 1.0,
        student_layers: Layers = ("last_stage",),
        teacher_layers: Layers = ("last_stage",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)

    @staticmethod
    def similarity(x: Tensor) -> Tensor:
        """G: the row-normalised b x b Gram matrix of the flattened activations."""
        q = x.flatten(1)
        return F.normalize(q @ q.T, p=2, dim=1)

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        return (self.similarity(t) - self.similarity(s)).pow(2).sum() / s.shape[0] ** 2


class PKT(_LayerPairs):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer"
    (ECCV), Sec. 3.

    The paper models each feature space by conditional probabilities from the cosine kernel
    K(a, b) = (a.b / (||a|| ||b||) + 1) / 2, in [0, 1], and minimises KL(P_teacher || P_student).
    As implemented, on flattened features x (b x d), both models separately:
    x_i <- x_i / (||x_i||_2 + eps); K = (X X^T + 1) / 2; P[i, j] = K[i, j] / sum_j K[i, j];
    loss = mean over all b^2 entries of P_t[i, j] * log((P_t[i, j] + eps) / (P_s[i, j] + eps)).

    Choices, following the reference code (the authors' code as used by RepDistiller): the
    self-similarity K[i, i] stays in the rows (the paper's sums skip it) and the reduction is the
    mean over b^2 entries, i.e. the batch-mean KL divided by b; weight 30000 was tuned for this
    scale. The reference also sets NaNs after the normalisation to 0; this does not, so a NaN
    input stops the run with the scheme's error rather than being hidden. Scale invariant
    (up to eps), and any feature widths compare directly.

    Defaults: CRD benchmark: penultimate embedding, eps 1e-7, weight 30000, cross-entropy 1.
    """

    key = "pkt"

    def __init__(
        self,
        eps: float = 1e-7,
        weight: float = 30000.0,
        task_weight: float = 1.0,
        student_layers: Layers = ("embedding",),
        teacher_layers: Layers = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)
        self.eps = checked_number(eps, self.name, "eps", "1e-7", strict=True)

    def probabilities(self, x: Tensor) -> Tensor:
        """P: the b x b row-stochastic matrix of shifted cosine similarities."""
        x = x.flatten(1)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        kernel = (x @ x.T + 1.0) / 2.0
        # Each row holds K[i, i] ~ 1 (or 1/2 everywhere for a zero vector): never a zero sum.
        return kernel / kernel.sum(dim=1, keepdim=True)

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        p_s, p_t = self.probabilities(s), self.probabilities(t)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


class CC(_LayerPairs):
    """Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang 2019, "Correlation Congruence for Knowledge
    Distillation" (ICCV), Sec. 3.

    Each model's features (flattened) pass through a learned linear embedding to `embed_dim`
    and are L2-normalised to F (n x embed_dim). The correlation matrix is psi(F)[i, j] = k(F_i, F_j)
    with the Gaussian RBF kernel k(x, y) = exp(-gamma ||x - y||^2) approximated by its order-P
    Taylor expansion, k(x, y) ~ sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (x.y)^p; the loss is
    L_CC = (1/n^2) ||psi(F_t) - psi(F_s)||_2^2, the mean squared difference of the two n x n
    matrices. The expansion is the RBF kernel's series only for unit vectors
    (||x - y||^2 = 2 - 2 x.y), which is why the embeddings are normalised.

    Defaults: P=2 and gamma=0.4 for the kernel (the paper's Gaussian-RBF setting as specified for
    kdlab); from the CRD benchmark: embed_dim 128 (its LinearEmbed to feat_dim), both embeddings
    trained with the student (both are in its trainable list), weight 0.02, cross-entropy 1, on
    the penultimate embedding. Caveat: the benchmark's CC term itself is kernel-free, the mean over
    i of sum_d |s_i - t_i|_d |s_{i+1} - t_{i+1}|_d on the embedded features; its 0.02 was tuned
    for that form, not for this one. Since the teacher's embedding is learned too, the term alone
    is minimised by both embeddings collapsing to one direction, where it stops teaching.
    """

    key = "cc"

    def __init__(
        self,
        gamma: float = 0.4,
        order: int = 2,
        embed_dim: int = 128,
        weight: float = 0.02,
        task_weight: float = 1.0,
        student_layers: Layers = ("embedding",),
        teacher_layers: Layers = ("embedding",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)
        self.gamma = checked_number(gamma, self.name, "gamma", 0.4, strict=True)
        for name, value, minimum, meaning, example in (
            ("order", order, 0, "the number of Taylor terms after the constant", 2),
            ("embed_dim", embed_dim, 1, "the width both embeddings map to", 128),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KdlabError(
                    f"CC: {name}={value!r} must be an integer >= {minimum}: {meaning}. "
                    f"Set knowledge.{self.name}.{name}, e.g. knowledge.{self.name}.{name}={example}."
                )
        self.order, self.embed_dim = order, embed_dim
        self.student_embeds = nn.ModuleList()
        self.teacher_embeds = nn.ModuleList()

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        pairs = self.pairs(student, source)
        widths = [(s.flatten(1).shape[1], t.flatten(1).shape[1]) for s, t in pairs]
        built = [
            (s.in_features, t.in_features)
            for s, t in zip(self.student_embeds, self.teacher_embeds, strict=True)
        ]
        if built == widths:
            return  # already built for these widths: keep the (possibly trained) embeddings
        self.student_embeds = nn.ModuleList(
            nn.Linear(s.flatten(1).shape[1], self.embed_dim, device=s.device, dtype=_full_precision(s).dtype)
            for s, _ in pairs
        )
        self.teacher_embeds = nn.ModuleList(
            nn.Linear(t.flatten(1).shape[1], self.embed_dim, device=t.device, dtype=_full_precision(t).dtype)
            for _, t in pairs
        )

    def correlation(self, z: Tensor) -> Tensor:
        """psi: the n x n truncated-Taylor RBF kernel matrix of the L2-normalised rows of z."""
        z = F.normalize(z, p=2, dim=1)
        x = 2 * self.gamma * (z @ z.T)
        term = torch.ones_like(x)
        total = term
        for p in range(1, self.order + 1):
            term = term * x / p  # (2 gamma x.y)^p / p!, built from the previous term
            total = total + term
        return math.exp(-2 * self.gamma) * total

    def pair_loss(self, index: int, s: Tensor, t: Tensor) -> Tensor:
        if len(self.student_embeds) != len(self.student_layers):
            raise KdlabError(
                "CC's embeddings are created by build() from the real feature widths, and it has not "
                "been called. Use CC inside a scheme (which builds it with one dry forward), or call "
                "cc.build(student_outputs, teacher_outputs) once before computing the loss."
            )
        z_s = self.student_embeds[index](s.flatten(1))
        z_t = self.teacher_embeds[index](t.flatten(1))
        return F.mse_loss(self.correlation(z_s), self.correlation(z_t))


class FSP(_LayerPairs):
    """Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning" (CVPR), Sec. 3.

    The FSP ("flow of solution procedure") matrix between two layers F1 (h x w x m) and F2
    (h x w x n) of one model is G[i, j] = sum_{s,t} F1[s, t, i] F2[s, t, j] / (h * w), and the loss
    is the squared L2 distance between the student's and the teacher's G, with equal weights over
    the layer pairs. As implemented (reference code): for each consecutive pair (l, l+1) of the
    listed layers of each model, the larger map is adaptive-average-pooled to the smaller's h x w
    (the paper pairs maps of equal size), G = F_l^T F_{l+1} / (h * w) is C_l x C_{l+1} per
    sample, and the loss is the sum over pairs of the mean over batch and matrix entries of
    (G_s - G_t)^2. 2-D features (b x c) count as 1 x 1 maps. Student layer i must have as many
    channels as teacher layer i: FSP compares the matrices entry by entry, so it is meant for
    pairs of the same widths (e.g. resnet14 -> resnet8, resnet32x4 -> resnet8x4).

    Defaults: weight 50, the CRD benchmark script's `-b 50` for FSP, on all stages. The reference
    code, though, uses FSP only in an unweighted pre-training stage of the student's feature layers
    (30 `init_epochs`), then trains with cross-entropy alone, so that flag has no effect there.
    Here FSP is an ordinary term added to the loss sum at every step; the two-stage schedule is
    not reproduced. The reference also pairs the stem's output with stage 1 (its feature list starts
    at the stem), giving three matrices on a CIFAR ResNet where [stages] gives two; kdlab's CIFAR
    ResNets expose the stem by module path, so `student_layers: [relu, stages]` (and the same for
    the teacher) reproduces its three.
    """

    key = "fsp"

    def __init__(
        self,
        weight: float = 50.0,
        task_weight: float = 1.0,
        student_layers: Layers = ("stages",),
        teacher_layers: Layers = ("stages",),
        name: str | None = None,
    ):
        super().__init__(weight, task_weight, student_layers, teacher_layers, name=name)

    def _maps(self, student: Outputs, source: Outputs) -> list[tuple[Tensor, Tensor]]:
        pairs = self.pairs(student, source)
        if len(pairs) < 2:
            raise KdlabError(
                f"FSP relates consecutive layers of each model, so it needs at least two layers per side, "
                f"but got student_layers={list(self.student_layers)} and teacher_layers="
                f"{list(self.teacher_layers)}. Set knowledge.{self.name}.student_layers=[stages] and "
                f"knowledge.{self.name}.teacher_layers=[stages], or list two or more layers on each side."
            )
        maps = []
        for i, (s, t) in enumerate(pairs):
            for side, layer, x in (
                ("student", self.student_layers[i], s),
                ("teacher", self.teacher_layers[i], t),
            ):
                if x.ndim not in (2, 4):
                    raise KdlabError(
                        f"FSP reads feature maps (batch x channels x height x width), but the {side}'s "
                        f"'{layer}' has shape {tuple(x.shape)}. Pick convolutional layers in "
                        f"knowledge.{self.name}.{side}_layers, e.g. [stages]."
                    )
            maps.append((s if s.ndim == 4 else s[..., None, None], t if t.ndim == 4 else t[..., None, None]))
        s_widths = [s.shape[1] for s, _ in maps]
        t_widths = [t.shape[1] for _, t in maps]
        if s_widths != t_widths:
            listing = "; ".join(
                f"student '{a}' {sw} vs teacher '{b}' {tw}"
                for a, b, sw, tw in zip(
                    self.student_layers, self.teacher_layers, s_widths, t_widths, strict=True
                )
            )
            raise KdlabError(
                "FSP compares the student's and the teacher's FSP matrices entry by entry, so each "
                "student layer needs as many channels as its teacher layer, but the channel counts "
                f"differ ({listing}). Set knowledge.{self.name}.student_layers and "
                f"knowledge.{self.name}.teacher_layers "
                "to layers of equal widths, or distil between models of the same widths (e.g. teacher "
                "resnet14 -> student resnet8, resnet32x4 -> resnet8x4): FSP is meant for same-width "
                "pairs. For models of different widths use a relation loss that compares batch x batch "
                "matrices instead (knowledge=sp or knowledge=rkd)."
            )
        return maps

    def build(self, student: Outputs, source: Outputs, context: LossContext | None = None) -> None:
        self._maps(student, source)

    @staticmethod
    def flow(first: Tensor, second: Tensor) -> Tensor:
        """G = F1^T F2 / (h*w): b x C1 x C2, after pooling both maps to the smaller size."""
        size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
        if tuple(first.shape[2:]) != size:
            first = F.adaptive_avg_pool2d(first, size)
        if tuple(second.shape[2:]) != size:
            second = F.adaptive_avg_pool2d(second, size)
        return torch.einsum("bihw,bjhw->bij", first, second) / (size[0] * size[1])

    def forward(
        self,
        student: Outputs,
        source: Outputs,
        batch: Mapping[str, Tensor],
        context: LossContext | None = None,
    ) -> Tensor:
        maps = self._maps(student, source)
        with torch.autocast(maps[0][0].device.type, enabled=False):
            maps = [(_full_precision(s), _full_precision(t)) for s, t in maps]
            losses = [
                (self.flow(s1, s2) - self.flow(t1, t2)).pow(2).mean()
                for (s1, t1), (s2, t2) in zip(maps[:-1], maps[1:], strict=True)
            ]
        return torch.stack(losses).sum()
