"""DOT, the distillation-oriented trainer: SGD with one momentum for the task gradient, one for KD's.

Zhao, Song, Song, Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023, Sec. 3.2 (Eq. 5-7):
with the run's momentum mu and a gap delta, the task loss's gradient is accumulated with momentum
mu - delta and the distillation losses' gradient with mu + delta, so the optimisation leans on
the distillation direction; both buffers move the parameters each step. A parameter that only one
of the two losses reaches (an adapter, the classifier under a features-only loss) keeps momentum
mu for it. Weight decay is added to the task gradient (to the distillation gradient where the task
loss does not reach the parameter), as in the authors' code (mdistiller, engine/dot.py), with one
difference: their first step of a parameter only the distillation loss reaches skips the weight
decay (its buffer starts from the raw gradient); here it is decayed from the first step, like
every other parameter.

The scheme hands the distillation gradient over (`add_distillation_grads`), computed with
`torch.autograd.grad` on the distillation part of its loss, and lets Lightning backpropagate the
task part as usual, so `p.grad` holds the task gradient when `step` runs. This works with any
knowledge and any scheme that splits its loss (kdlab.schemes.base.Scheme.loss_to_backpropagate).
Under DDP the distillation gradient is averaged over processes here (Lightning's reducer averages
the task gradient). Gradient clipping (trainer.gradient_clip_val) applies to the task gradient only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer


class DOT(Optimizer):
    """SGD with separate task (mu - delta) and distillation (mu + delta) momentum.

    Args:
        params: the parameters (one group).
        lr: learning rate.
        momentum: mu, the momentum of plain SGD this replaces (0.9 in the CIFAR recipe).
        delta: the gap (0.075 in the paper's CIFAR and ImageNet recipes).
        weight_decay: L2 penalty, added to the task gradient.
        dampening: as torch.optim.SGD's.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.05,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(
                f"Invalid momentum {momentum} with delta {delta}: both momentum - delta and momentum + delta "
                "must lie in [0, 1)"
            )
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay, dampening=dampening)
        super().__init__(params, defaults)

    @torch.no_grad()
    def add_distillation_grads(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Accumulate the distillation losses' gradient of each parameter until the next `step`."""
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            state = self.state[p]
            if state.get("distill_grad") is None:
                state["distill_grad"] = g.detach().clone()
            else:
                state["distill_grad"].add_(g)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._average_distillation_grads()
        for group in self.param_groups:
            mu, delta, lr = group["momentum"], group["delta"], group["lr"]
            decay, dampening = group["weight_decay"], group["dampening"]
            for p in group["params"]:
                state = self.state[p]
                task, distill = p.grad, state.pop("distill_grad", None)
                both = task is not None and distill is not None
                if task is not None:
                    d_p = task.add(p, alpha=decay) if decay else task
                    self._apply(p, state, "task_momentum", d_p, mu - delta if both else mu, lr, dampening)
                if distill is not None:
                    d_p = distill if task is not None or not decay else distill.add(p, alpha=decay)
                    self._apply(p, state, "distill_momentum", d_p, mu + delta if both else mu, lr, dampening)
        return loss

    @staticmethod
    def _apply(
        p: Tensor, state: dict, key: str, d_p: Tensor, momentum: float, lr: float, dampening: float
    ) -> None:
        buf = state.get(key)
        if buf is None:  # the first step takes the gradient itself, as torch.optim.SGD does
            buf = state[key] = d_p.detach().clone()
        else:
            buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
        p.add_(buf, alpha=-lr)

    def _average_distillation_grads(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for group in self.param_groups:
            for p in group["params"]:
                # Every process runs the same graph, so the same parameters have a gradient on each.
                grad = self.state[p].get("distill_grad")
                if grad is not None:
                    dist.all_reduce(grad)
                    grad.div_(dist.get_world_size())
