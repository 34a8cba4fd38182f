"""Auxiliary exits (shallow classifiers) for BYOT self-distillation.

Paper: Zhang et al. 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation" (ICCV). BYOT splits a backbone into its stages and attaches to
every shallow stage a classifier made of a "bottleneck" and a fully connected layer (Fig. 2);
the deepest stage keeps the backbone's own head. Training adds, per shallow exit, cross-entropy,
KL towards the deepest classifier and an L2 "hint" between the exit's bottleneck output and the
deepest stage's feature map, which is why every bottleneck must produce exactly the deepest
stage's (C, H, W).

Exit design (the paper gives no layer list; its released code uses depthwise-separable convs):
per halving of the resolution, one ResNet-style bottleneck unit (He et al. 2016, "Deep Residual
Learning for Image Recognition", sec. 4.1, the usual meaning of "bottleneck" for these nets):
1x1 conv-BN-ReLU narrowing to a quarter of the step's output width (at least 16 channels, at
most the step's own widths), 3x3 stride-2 conv-BN-ReLU, 1x1 conv-BN-ReLU widening back, without
the residual shortcut (input and output shapes differ). A stage already at the deepest
resolution gets a single 1x1 conv-BN-ReLU. Plain convolutions rather than depthwise-separable
ones are chosen because the backbones kdlab targets are small CIFAR nets (16-256 channels), where
a depthwise 3x3 on a handful of channels is a weak feature extractor and saves few parameters;
the quarter-width middle is what keeps exits affordable on the wide stages of ShuffleNet and
ResNet-50. The widths grow geometrically from the stage's channels to the deepest stage's, as
the backbones themselves double width when they halve resolution.

Two adjustments keep the hint well-posed on every kdlab backbone: where the backbone floors an
odd side (max-pool 7 -> 3) and the strided conv would not (7 -> 4), a final adaptive average
pool trims the map to the exact size; and where the deepest stage is read before its activation
(the pre-activation WRNs and MobileNetV2 give negative values), the bottleneck ends on BatchNorm
instead of ReLU. The sign is checked on the dry forward pass that `AuxiliaryExits` makes anyway.

`AuxiliaryExits` holds only the exits, never the backbone, so a backbone checkpoint is the
same with or without BYOT and the exits can be dropped after training (the paper's deployed
network is the backbone alone, or a truncated backbone plus one exit).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.models.weight_init import he_fan_out_init
from kdlab.taps import FeatureTap, expand_layers, stage_aliases

# Narrowest middle (3x3) width of a bottleneck step, unless the step's own ends are narrower.
_MIN_MID = 16


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _halved(size: tuple[int, int]) -> tuple[int, int]:
    # Output side of a 3x3 stride-2 convolution with padding 1: floor((s - 1) / 2) + 1.
    return ((size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1)


def _conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True
) -> list[nn.Module]:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class Exit(nn.Module):
    """One shallow classifier: bottleneck to the deepest stage's (C, H, W), global pool, linear.

    `in_size`/`out_size` are the spatial sides (an int for square maps, or (H, W)).
    `final_relu=False` ends the bottleneck on BatchNorm, for backbones whose deepest stage
    output is taken before its activation (e.g. the pre-activation WRNs): a ReLU there would
    keep the L2 hint from ever matching the negative half of the target.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: int | tuple[int, int],
        out_channels: int,
        out_size: int | tuple[int, int],
        num_classes: int,
        *,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        src, dst = _pair(in_size), _pair(out_size)
        if min(in_channels, out_channels, num_classes, *src, *dst) < 1:
            raise KdlabError(
                f"An auxiliary exit needs positive channels, sizes and class count, got in_channels="
                f"{in_channels}, in_size={src}, out_channels={out_channels}, out_size={dst}, num_classes="
                f"{num_classes}. Build exits with AuxiliaryExits, which reads these from the model."
            )
        if src[0] < dst[0] or src[1] < dst[1]:
            raise KdlabError(
                f"An auxiliary exit only downsamples, but its stage's {src} map is smaller than the "
                f"deepest stage's {dst}. BYOT attaches exits to stages that come before the deepest one; "
                "check that the model's tap_points list its stages in order of depth."
            )
        self.out_shape = (out_channels, *dst)

        # As many halvings as keep the map at least as large as the target; a remainder left by
        # the backbone flooring odd sides (e.g. max-pool 7 -> 3 where the conv gives 4) is
        # removed by an adaptive average pool so the hint loss sees exactly the target shape.
        sizes = [src]
        while _halved(sizes[-1])[0] >= dst[0] and _halved(sizes[-1])[1] >= dst[1] and sizes[-1] != dst:
            sizes.append(_halved(sizes[-1]))
        steps = len(sizes) - 1

        layers: list[nn.Module] = []
        if steps == 0:
            # Same resolution already: a 1x1 conv is enough to match the channel count.
            layers += _conv_bn_relu(in_channels, out_channels, 1, relu=final_relu)
        else:
            ratio = out_channels / in_channels
            widths = [in_channels] + [round(in_channels * ratio ** (i / steps)) for i in range(1, steps)]
            widths.append(out_channels)
            for i in range(steps):
                w_in, w_out = widths[i], widths[i + 1]
                # He et al.'s bottleneck narrows the 3x3 to a quarter of the output width, which
                # keeps exits on wide stages (ShuffleNet's 960, ResNet-50's 2048) affordable; the
                # floor of 16 (the narrowest CIFAR ResNet stage) keeps small nets' 3x3 from
                # collapsing to a few channels, and the middle never exceeds the step's ends.
                mid = min(w_in, w_out, max(_MIN_MID, w_out // 4))
                last = i == steps - 1
                layers += _conv_bn_relu(w_in, mid, 1)
                layers += _conv_bn_relu(mid, mid, 3, stride=2)
                layers += _conv_bn_relu(mid, w_out, 1, relu=final_relu or not last)
        if sizes[-1] != dst:
            layers.append(nn.AdaptiveAvgPool2d(dst))
        self.bottleneck = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        he_fan_out_init(self)  # the CIFAR backbones' scheme: He fan-out convs, identity BatchNorm

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature_map = self.bottleneck(x)
        logits = self.fc(torch.flatten(self.avgpool(feature_map), 1))
        return feature_map, logits


def _stage_names(model: nn.Module) -> list[str]:
    aliases = stage_aliases(model)
    if len(aliases) < 2:
        found = f"only {aliases[0]!r}" if aliases else "no named stages"
        raise KdlabError(
            f"BYOT self-distillation needs a model with at least two named stages (tap_points "
            f"stage1..stageN), but {type(model).__name__} has {found}. Use a kdlab model with named "
            "stages, such as the CIFAR ResNets (resnet8, resnet32x4, ...), WRNs, VGGs or lightnn; "
            "torchvision's models other than its ResNets are not supported for self-distillation because "
            "kdlab does not know where their stages end."
        )
    # expand_layers orders the stages by their number (stage10 after stage9).
    return expand_layers(model, ["stages"])


def _probe_stages(
    model: nn.Module, stages: list[str], input_shape: tuple[int, int, int]
) -> tuple[dict[str, tuple[int, int, int]], bool]:
    """Each stage's output (C, H, W) from one dry forward, and whether the deepest is never negative."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    # A private generator: the dry run must not shift the global RNG (reproducible seeds).
    # Random rather than zero input, so that the sign check sees a representative map.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=gen).to(device=device, dtype=dtype)
    tap = FeatureTap(model, stages, role="BYOT backbone")
    was_training = model.training
    model.eval()  # eval: BatchNorm running statistics must not move during the dry run
    try:
        with torch.no_grad():
            feats = tap(x).feats
    except RuntimeError as exc:
        raise KdlabError(
            f"The dry forward pass of {type(model).__name__} on a {input_shape} input failed ({exc}). "
            "Pass the (channels, height, width) of the images the model is trained on as input_shape."
        ) from exc
    finally:
        tap.remove()
        model.train(was_training)
    shapes: dict[str, tuple[int, int, int]] = {}
    for name in stages:
        feat = feats.get(name)
        if not isinstance(feat, Tensor) or feat.dim() != 4:
            got = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
            raise KdlabError(
                f"BYOT exits need each stage to output a [B, C, H, W] feature map, but "
                f"{type(model).__name__}'s {name} ({model.tap_points[name]}) gave {got}. Point the "
                "model's stage tap_points at convolutional blocks."
            )
        shapes[name] = (feat.shape[1], feat.shape[2], feat.shape[3])
    return shapes, bool((feats[stages[-1]] >= 0).all())


class AuxiliaryExits(nn.Module):
    """One `Exit` per shallow stage of `model`, keyed by stage name ("stage1", ...).

    The backbone is only read once, in a dry forward pass that learns each stage's output shape;
    it is not stored, so its state_dict, its outputs and its checkpoints are untouched.
    Feed `forward` the stage outputs of a `FeatureTap(model, expand_layers(model, ["stages"]))`.
    """

    def __init__(self, model: nn.Module, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        stages = _stage_names(model)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise KdlabError(
                f"input_shape must be the (channels, height, width) of one image, got {tuple(input_shape)}. "
                "Pass e.g. (1, 28, 28) for Fashion-MNIST or (3, 32, 32) for CIFAR."
            )
        shapes, non_negative = _probe_stages(model, stages, tuple(input_shape))
        self.stage_names: list[str] = stages[:-1]
        self.deepest: str = stages[-1]
        out_c, out_h, out_w = shapes[self.deepest]
        self.exits = nn.ModuleDict(
            {
                name: Exit(
                    shapes[name][0],
                    shapes[name][1:],
                    out_c,
                    (out_h, out_w),
                    num_classes,
                    # A deepest stage read before its activation (pre-activation nets) can be
                    # negative; the exits must then be able to produce negatives too.
                    final_relu=non_negative,
                )
                for name in self.stage_names
            }
        )
        param = next(model.parameters(), None)
        if param is not None:
            # Live where the backbone lives, so the exits can be fed its features directly.
            self.exits.to(device=param.device, dtype=param.dtype)

    def forward(self, stage_features: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        missing = [name for name in self.stage_names if name not in stage_features]
        if missing:
            raise KdlabError(
                f"The auxiliary exits need the features of {', '.join(self.stage_names)}, but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Tap the backbone with "
                "FeatureTap(model, expand_layers(model, ['stages'])) and pass the resulting Outputs.feats."
            )
        return {name: self.exits[name](stage_features[name]) for name in self.stage_names}
