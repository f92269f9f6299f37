"""`lora` / `loraN`: a low-rank update W + (alpha/r)·B·A on every frozen Linear and every 1×1
conv of the backbone (rank 4, or N), initialised as HF peft does (A kaiming-uniform, B zero,
so training starts from the pretrained model). W stays frozen (int8); A and B train, and with
them the head. The inference export merges B·A into W (see `lora_layers`)."""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..errors import RecipeError
from ..graph import LeanGraph
from ..rules.linear import Linear
from ..rules.lora import LoraConv2d, LoraLinear
from .base import Part, PrepareContext, register

DEFAULT_RANK = 4
ALPHA = 8.0  # peft's default lora_alpha: scale 2 at rank 4, 1 at rank 8


class Lora(Part):
    def __init__(self, rank: int = DEFAULT_RANK):
        if rank < 1:
            raise RecipeError(f"'lora{rank}': the rank must be at least 1")
        self.rank = rank
        self.name = "lora" if rank == DEFAULT_RANK else f"lora{rank}"

    def apply(self, graph: LeanGraph, ctx: PrepareContext) -> None:
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        trainable = set(graph.trainable)
        scale = ALPHA / self.rank
        layers = 0
        for n in graph.nodes:
            weight = n.params.get("weight")
            if n.name == ctx.head or weight is None or weight in trainable:
                continue
            w = graph.tensors[weight]
            if type(n.rule) is Linear:
                n.rule = LoraLinear.around(n.rule, self.rank, scale)
                a_shape, b_shape = (self.rank, w.shape[1]), (w.shape[0], self.rank)
            elif LoraConv2d.fits(n.rule):
                n.rule = LoraConv2d.around(n.rule, self.rank, scale)
                a_shape, b_shape = (self.rank, w.shape[1], 1, 1), (w.shape[0], self.rank, 1, 1)
            else:
                continue
            a = torch.empty(a_shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # as peft (nn.Linear's default)
            base = weight[: -len(".weight")] if weight.endswith(".weight") else weight
            for role, value in (("lora_a", a), ("lora_b", torch.zeros(b_shape))):
                name = _unique(graph, f"{base}.{role}")
                graph.tensors[name] = value
                n.params[role] = name
                graph.trainable.append(name)
            layers += 1
        if not layers:
            raise RecipeError(f"'{self.name}' found no frozen Linear or 1×1 conv in the backbone to adapt")
        ctx.notes["lora"] = {"rank": self.rank, "alpha": ALPHA, "layers": layers}


def _unique(graph: LeanGraph, name: str) -> str:
    out, k = name, 1
    while out in graph.tensors:
        out, k = f"{name}_{k}", k + 1
    return out


def lora_layers(graph: LeanGraph) -> list:
    """The nodes that carry a LoRA branch, in schedule order."""
    return [n for n in graph.nodes if isinstance(n.rule, (LoraLinear, LoraConv2d))]


@register
def lora(token: str):
    m = re.fullmatch(r"lora(\d*)", token)
    return Lora(int(m.group(1)) if m.group(1) else DEFAULT_RANK) if m else None


lora.token = "lora/loraN"
