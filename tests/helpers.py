"""Shared test utilities."""
from __future__ import annotations

import torch

from edgetl.optim import OptimizerConfig
from edgetl.reference import reference_steps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude."""
    return float((a.detach().cpu() - b.detach().cpu()).abs().max() / (b.detach().cpu().abs().max() + 1e-12))


def lean_vs_reference(pm, x, y, optimizer: OptimizerConfig, steps: int = 1, device: str = "cpu",
                      scale: str = "element"):
    """Run `steps` lean steps and the autograd reference; return (grad errors, param errors) by tensor."""
    step = pm.step_module(optimizer).to(device)
    x, y = x.to(device), y.to(device)
    params = {k: v.to(device) for k, v in pm.initial_params().items()}
    state = step.init_state(params)
    first_grads = None
    for i in range(steps):
        loss, logits, params, state, grads = step.run(x, y, optimizer.lr, params, state)
        first_grads = first_grads or grads
    ref = reference_steps(pm, x, y, optimizer, steps)
    gerr = {t: rel_err(first_grads[t], ref.grads[t]) for t in pm.trainable}
    err = param_err if scale == "element" else rel_err
    perr = {t: err(params[t], ref.params[t]) for t in pm.trainable}
    return gerr, perr


def param_err(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> float:
    """Elementwise relative error with a small absolute floor (zero-initialised biases make a
    tensor-wide scale meaningless): < 1e-5 means allclose(rtol=1e-5, atol=1e-6)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    return float(((a - b).abs() / (b.abs() + atol / 1e-5)).max())
