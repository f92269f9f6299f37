"""The one graph interpreter: runs a lean graph's forward node by node, dropping each value
after its last use. What a node computes is pluggable (the lean rule with its kept tensors, the
autograd reference, plain compute), and so is where its weights come from."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .graph import INPUT, LeanGraph, Node

Tensor = torch.Tensor
NodeOp = Callable[[Node, list[Tensor]], Tensor]


def interpret(graph: LeanGraph, x: Tensor, op: NodeOp, free: Callable[[str], None] | None = None,
              order: list[Node] | None = None, vals: dict[str, Tensor] | None = None) -> Tensor:
    """The graph's output for input `x`; `op(node, inputs)` computes one node and `free(name)`
    hears when a value is dropped. `order`: the nodes in another topological order than the graph's;
    `vals`: the live values by name, the caller's (an op may replace one by an equal copy)."""
    left = {k: len(v) for k, v in graph.consumers().items()}
    vals = {} if vals is None else vals
    vals[INPUT] = x
    for n in graph.nodes if order is None else order:
        xs = [vals[i] for i in n.inputs]
        for i in n.inputs:  # a value's last user gets the only reference to it (it may drop it early)
            left[i] -= 1
            if left[i] == 0 and i != INPUT:
                vals.pop(i, None)
        vals[n.name] = op(n, xs)
        xs = None
        for i in dict.fromkeys(n.inputs):
            if left[i] == 0 and i != INPUT and free is not None:
                free(i)
    return vals.pop(graph.output)


def weights_from(params: Mapping[str, Tensor], frozen: Callable[[str], Tensor]) -> Callable[[Node], dict[str, Tensor]]:
    """A node's tensors by role: trainable ones from `params`, the others from `frozen(name)`."""
    return lambda n: {role: params[t] if t in params else frozen(t) for role, t in n.params.items()}


def computing(weights: Callable[[Node], Mapping[str, Tensor]], reference: bool = False) -> NodeOp:
    """The plain forward of each rule (`reference=True`: the forward autograd differentiates)."""
    if reference:
        return lambda n, xs: n.rule.reference(xs, weights(n))
    return lambda n, xs: n.rule.compute(xs, weights(n))
