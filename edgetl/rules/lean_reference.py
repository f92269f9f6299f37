"""The autograd reference of a rule whose backward is an approximation by design (what it keeps is
stored in 8 or 4 bits): the exact forward, and as backward the rule's own backward from what its
forward kept. Family tests compare whole lean steps against autograd with such rules in place; each
rule's approximation itself is measured against exact autograd in tests/test_rules_attn.py."""
from __future__ import annotations

from typing import Mapping

import torch

from .base import Need, Rule, Tensor


class _LeanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, names, nx, *tensors):
        xs, ws = list(tensors[:nx]), dict(zip(names, tensors[nx:]))
        need = Need(tuple(True for _ in xs), frozenset(names))
        y, kept = rule.forward(xs, ws, need)
        ctx.rule, ctx.need, ctx.kept, ctx.ws, ctx.names = rule, need, kept, ws, names
        return y

    @staticmethod
    def backward(ctx, g):
        gxs, gps = ctx.rule.backward(g, dict(ctx.kept), ctx.ws, ctx.need)
        return (None, None, None, *gxs, *(gps.get(n) for n in ctx.names))


def lean_backward(rule: Rule, xs: list[Tensor], w: Mapping[str, Tensor]) -> Tensor:
    names = tuple(w)
    return _LeanBackward.apply(rule, names, len(xs), *xs, *(w[n] for n in names))
