"""The lean graph: a flat, topologically ordered list of layers with backward rules."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rules.base import Rule

INPUT = "input"


@dataclass
class Node:
    name: str
    rule: Rule
    inputs: list[str]
    module: str = ""
    params: dict[str, str] = field(default_factory=dict)  # role ("weight", "bias") -> tensor name
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)  # per sample, without the batch dim
    out_shape: tuple[int, ...] = ()
    block: int = -1  # index into LeanGraph.blocks, -1 when the node belongs to none


@dataclass
class LeanGraph:
    nodes: list[Node]
    input_shape: tuple[int, ...]  # per sample: (C, H, W) or (C, L)
    tensors: dict[str, torch.Tensor]  # fp32 value of every parameter tensor
    output: str  # node producing the logits
    features: str = ""  # node whose output feeds the classifier head
    blocks: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)  # ordered names of the tensors that train
    frozen_dtype: str = "int8"  # storage of frozen conv/linear weights: "int8" or "fp32"
    mask_activations: bool = False

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {INPUT: []}
        for n in self.nodes:
            out.setdefault(n.name, [])
            for i in n.inputs:
                out.setdefault(i, []).append(n.name)
        return out

    def unique_name(self, base: str) -> str:
        taken = {n.name for n in self.nodes} | {INPUT}
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def insert_after(self, anchor: str, node: Node) -> None:
        idx = next(i for i, n in enumerate(self.nodes) if n.name == anchor)
        self.nodes.insert(idx + 1, node)

    def weight_roles(self) -> dict[str, tuple[Node, str]]:
        """tensor name -> (node, role) for every parameter tensor."""
        return {t: (n, role) for n in self.nodes for role, t in n.params.items()}

    def is_quantized(self, tensor: str) -> bool:
        """Frozen conv/linear weights are stored int8 (unless fp32 was asked for); biases stay fp32."""
        if tensor in self.trainable or self.frozen_dtype != "int8":
            return False
        node, role = self.weight_roles()[tensor]
        return role == "weight" and node.rule.quantizable

    def requires_grad(self) -> dict[str, bool]:
        """Which node outputs depend on a trainable tensor (and so carry a gradient)."""
        trainable = set(self.trainable)
        req = {INPUT: False}
        for n in self.nodes:
            req[n.name] = any(req[i] for i in n.inputs) or any(t in trainable for t in n.params.values())
        return req

    def infer_shapes(self, until: str | None = None) -> None:
        """Fill in_shapes/out_shape by running every rule on meta tensors (batch 2),
        stopping before node `until` when given."""
        vals = {INPUT: torch.empty((2, *self.input_shape), device="meta")}
        for n in self.nodes:
            if n.name == until:
                return
            xs = [vals[i] for i in n.inputs]
            ws = {role: self.tensors[t].to("meta") for role, t in n.params.items()}
            shapes = [tuple(x.shape[1:]) for x in xs]
            y = n.rule.bind(shapes).compute(xs, ws)
            n.rule = n.rule.bind(shapes, tuple(y.shape[1:]))
            n.in_shapes = shapes
            n.out_shape = tuple(y.shape[1:])
            vals[n.name] = y

    def total_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def trainable_params(self) -> int:
        return sum(self.tensors[t].numel() for t in self.trainable)
