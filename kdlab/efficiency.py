"""What a model costs to deploy: FLOPs per image, measured latency, and the size of its weights.

Distillation users deploy the student, so a run reports what the student buys over its teacher,
not only its accuracy (kdlab/run.py puts these figures in the results table and metrics.json):
- FLOPs of one forward pass on one image (for a language model, one window of the data's length),
  counted by `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs (a
  Linear(n, m) on one input is 2nm; bias additions, activations and pooling count nothing);
- latency: the median wall time of a few forward passes (5, or 3 for a slow model), after one or two
  warm-up passes, in eval mode under `torch.inference_mode`, in float32, on the given device
  (synchronised on CUDA), with as many CPU threads as the run has;
- weights: the bytes of the model's state_dict as `torch.save` writes it.

Each model is measured as it would be deployed: a copy without the forward hooks kdlab's feature
taps register, without a `torch.compile` wrapper, and in the default (contiguous) memory format. A
model with an input of its own (kdlab/models/inputs.py) keeps its conversion: it is measured on the
data's images, and its FLOPs are those of the network at its own size.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WARMUP = 2
REPEATS = 5
MIN_REPEATS = 3  # timed passes kept however long they take
BUDGET_S = 0.25  # seconds of passes (per model and batch size) after which the optional ones are skipped
# Module attributes holding hooks: the copy that is measured gets them empty (see `deployed_copy`).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def deployed_copy(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """A copy of `model` on `device` in eval mode, as a user would load it: no forward hooks (the
    originals keep theirs), no `torch.compile` wrapper, contiguous weights. `model` is left as it was."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    # deepcopy takes what `memo` already holds as the copy: hook dicts holding only the hooks that are
    # part of the model (its input conversion, kdlab/models/inputs.py), so the taps' hooks and the
    # features they last stored are never copied.
    memo: dict[int, Any] = {
        id(hooks): OrderedDict((k, h) for k, h in hooks.items() if getattr(h, "part_of_model", False))
        for module in model.modules()
        for hooks in (getattr(module, name, None) for name in _HOOK_DICTS)
        if hooks is not None
    }
    bare = copy.deepcopy(model, memo)
    return bare.to(device=device, memory_format=torch.contiguous_format).eval()


def example_inputs(
    input_shape: Sequence[int], batch_size: int, vocab_size: int | None = None, random: bool = True
) -> torch.Tensor:
    """A batch of inputs: images of `input_shape` (C, H, W), or, given `vocab_size`, sequences of token
    ids of that vocabulary, `input_shape` being (tokens,). Random ones are drawn from a fixed seed."""
    shape = (batch_size, *input_shape)
    generator = torch.Generator().manual_seed(0)  # the global RNG is left alone
    if vocab_size is not None:
        if not random:
            return torch.zeros(shape, dtype=torch.int64)
        return torch.randint(vocab_size, shape, generator=generator)
    return torch.randn(shape, generator=generator) if random else torch.zeros(shape)


def flops_per_image(
    model: nn.Module,
    input_shape: Sequence[int],
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
) -> int:
    """FLOPs of one forward pass of `model` on one input of `input_shape` (C, H, W; or a sequence of
    tokens of `vocab_size`), a multiply-add counted as 2."""
    x = example_inputs(input_shape, 1, vocab_size, random=False).to(device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def latency_ms(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    budget_s: float = BUDGET_S,
    vocab_size: int | None = None,
) -> float:
    """The median time in milliseconds of a forward pass of `model` on a batch of `batch_size`
    random inputs of `input_shape` (token ids, given `vocab_size`), over `repeats` passes after `warmup`
    untimed ones.

    Once the passes so far took `budget_s` seconds, the rest are skipped, except the first warm-up
    pass and the first 3 timed ones: a teacher that takes a third of a second a batch costs about
    a second, not seven passes' worth.
    """
    device = torch.device(device)
    x = example_inputs(input_shape, batch_size, vocab_size).to(device)
    times: list[float] = []
    spent = 0.0
    with torch.inference_mode():
        for i in range(warmup + max(repeats, 1)):
            timed = i >= warmup
            needed = i == 0 or (timed and len(times) < MIN_REPEATS)
            if spent > budget_s and not needed:
                if timed:
                    break
                continue  # the remaining warm-up passes
            _synchronize(device)
            started = time.perf_counter()
            model(x)
            _synchronize(device)
            took = time.perf_counter() - started
            spent += took
            if timed:
                times.append(took)
    return 1000 * statistics.median(times)


def weights_bytes(model: nn.Module) -> int:
    """The size of `torch.save(model.state_dict(), ...)`: written to a buffer, the same bytes as a file
    named archive.pt (torch stores the file's name in it, once per tensor: other names differ slightly)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
) -> dict[str, float | int]:
    """One model's figures: parameters, FLOPs per input, latency at batch 1 and `batch_size`, weights."""
    bare = deployed_copy(model, device)
    return {
        "params": sum(p.numel() for p in bare.parameters()),
        "flops": flops_per_image(bare, input_shape, device, vocab_size),
        "latency_ms_batch_1": latency_ms(bare, input_shape, 1, device, vocab_size=vocab_size),
        "latency_ms_training_batch": latency_ms(bare, input_shape, batch_size, device, vocab_size=vocab_size),
        "weights_bytes": weights_bytes(bare),
    }


def measure_models(
    models: dict[str, nn.Module],
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    student: str = "student",
    teacher: str = "teacher",
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Every model's figures, and the student's divided by the teacher's (`ratio`, None without both):
    the record metrics.json keeps as `efficiency`. Language models (`vocab_size`) are measured on
    sequences of `input_shape` = (tokens,)."""
    measured = {
        name: measure(model, input_shape, batch_size, device, vocab_size) for name, model in models.items()
    }
    ratio = None
    if student in measured and teacher in measured:
        ratio = {key: _ratio(measured[student][key], measured[teacher][key]) for key in measured[student]}
    return {
        "device": str(device),
        "input_shape": list(input_shape),
        "batch_size": batch_size,
        "models": measured,
        "ratio": ratio,
    }


def ratio_line(efficiency: dict[str, Any] | None) -> str | None:
    """The sentence under the results table: the student's figures as multiples of the teacher's."""
    ratio = (efficiency or {}).get("ratio")
    if not ratio:
        return None
    r = {key: _times(value) for key, value in ratio.items()}
    return (
        f"Student / teacher: {r['params']} parameters, {r['flops']} FLOPs, {r['weights_bytes']} weights, "
        f"{r['latency_ms_batch_1']} latency at batch 1 and {r['latency_ms_training_batch']} at batch "
        f"{efficiency['batch_size']} (measured on {efficiency['device']})."
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _times(ratio: float | None) -> str:
    """0.011x, 0.22x, 1.50x: two significant digits below 1."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio >= 1 else f"{ratio:.2g}x"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
