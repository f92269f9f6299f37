"""The parity reference: the same prepared model (same dequantized int8 weights) trained by
torch autograd and torch.optim. Every lean rule is checked against this."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .interpret import computing, interpret, weights_from
from .optim import OptimizerConfig


@dataclass
class ReferenceRun:
    losses: list[float]
    grads: dict[str, torch.Tensor]  # of the first step
    params: dict[str, torch.Tensor]  # after the last step


def reference_logits(prepared, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = weights_from(params, lambda t: prepared.frozen(t).to(x.device))
    return interpret(prepared.graph, x, computing(weights, reference=True))


def reference_steps(prepared, x: torch.Tensor, y: torch.Tensor, optimizer: OptimizerConfig, steps: int = 1,
                    params: dict[str, torch.Tensor] | None = None) -> ReferenceRun:
    params = params or prepared.initial_params()
    leaves = {t: params[t].detach().clone().to(x.device).requires_grad_(True) for t in prepared.trainable}
    opt = optimizer.torch_optimizer(list(leaves.values()))
    losses, first = [], {}
    for i in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(reference_logits(prepared, x, leaves), y)
        loss.backward()
        if i == 0:
            first = {t: v.grad.detach().clone() for t, v in leaves.items()}
        opt.step()
        losses.append(float(loss))
    return ReferenceRun(losses, first, {t: v.detach().clone() for t, v in leaves.items()})
