"""Run one rule by hand (bind, forward, backward), as the lean step does, without a tracer."""
from __future__ import annotations

import torch

from edgetl.rules import Need, Rule


def bind(rule: Rule, x: torch.Tensor, w: dict[str, torch.Tensor] | None = None) -> Rule:
    """Bind `rule` to x's per-sample shape, and its output's, as LeanGraph.infer_shapes does."""
    w = w or {}
    meta = x.to("meta")
    y = rule.bind([tuple(x.shape[1:])]).compute([meta], {k: v.to("meta") for k, v in w.items()})
    return rule.bind([tuple(x.shape[1:])], tuple(y.shape[1:]))


def lean_grads(rule: Rule, x: torch.Tensor, g: torch.Tensor, w: dict[str, torch.Tensor] | None = None,
               params: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(y, dL/dx, parameter grads, kept) of the lean rule for dL/dy = g."""
    w = w or {}
    need = Need((True,), params)
    y, kept = rule.forward([x], w, need)
    (gx,), gp = rule.backward(g, dict(kept), w, need)
    return y, gx, gp, kept


class RuleStep(torch.nn.Module):
    """One rule's forward and backward as a module (what the exporters trace): (x, g) -> (y, dL/dx)."""

    def __init__(self, rule: Rule, w: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.rule, self.w = rule, w or {}

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        need = Need((True,), frozenset())
        y, kept = self.rule.forward([x], self.w, need)
        (gx,), _ = self.rule.backward(g, kept, self.w, need)
        return y, gx
