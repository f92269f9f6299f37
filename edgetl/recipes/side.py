"""`side`: a ladder side network (LST). Taps at the last feature map of each backbone
resolution are average-pooled to the smallest tap resolution (adaptively when it does not
divide), projected by a trainable 1×1 conv, summed into a side stream refined by a trainable
3×3 depthwise conv and ReLU (1-D convs on (C, L) feature maps). The side
stream's pooled output joins the backbone's pooled features at the head. The backbone itself
gets no gradient, so nothing of it is kept for backward except the pooled taps."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import rules as R
from ..errors import RecipeError
from ..graph import LeanGraph, Node
from .base import Part, PrepareContext, register

MAX_TAPS = 5
TARGET_FRACTION = 0.02  # side parameters as a fraction of the backbone's


class Side(Part):
    name = "side"

    def __init__(self, width: int | None = None):
        self.width = width

    def apply(self, graph: LeanGraph, ctx: PrepareContext) -> None:
        head = graph.node(ctx.head)
        taps = _taps(graph, head)
        if not taps:
            raise RecipeError("'side' needs a backbone with (C, H, W) or (C, L) feature maps before its head")
        channels = sum(graph.node(t).out_shape[0] for t in taps)
        d = self.width or int(min(128, max(8, round(TARGET_FRACTION * ctx.backbone_params / (channels + 10) / 8) * 8)))
        size = tuple(graph.node(taps[-1]).out_shape[1:])
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        try:
            prev = None
            for i, tap in enumerate(taps):
                prev = _stage(graph, i, tap, prev, d, size)
        finally:
            torch.random.set_rng_state(gen_state)
        feats = head.inputs[0]
        gap = Node(graph.unique_name("side_gap"), R.GlobalAvgPool(), [prev], "side.out")
        flat = Node(graph.unique_name("side_flat"), R.Flatten(), [gap.name], "side.out")
        cat = Node(graph.unique_name("side_concat"), R.Concat(), [feats, flat.name], "side.out")
        idx = graph.nodes.index(head)
        graph.nodes[idx:idx] = [gap, flat, cat]
        head.inputs = [cat.name]
        graph.infer_shapes(until=head.name)
        ctx.notes["side"] = {"taps": taps, "width": d, "resolution": list(size)}


def _taps(graph: LeanGraph, head: Node) -> list[str]:
    """The last feature map (larger than 1×1) at each spatial resolution before the head, in
    schedule order, of the input's rank; 1×1 maps are pooled vectors (e.g. squeeze-excite), not
    taps, and maps that grow again are left out (the taps must pool down to the last one)."""
    rank = len(graph.input_shape)
    last: dict[tuple[int, ...], int] = {}
    nodes = graph.nodes[: graph.nodes.index(head)]
    for i, n in enumerate(nodes):
        if len(n.out_shape) == rank and math.prod(n.out_shape[1:]) > 1:
            last[tuple(n.out_shape[1:])] = i
    taps = [nodes[i].name for i in sorted(last.values())][-MAX_TAPS:]
    size = graph.node(taps[-1]).out_shape[1:] if taps else ()
    return [t for t in taps if all(a >= b for a, b in zip(graph.node(t).out_shape[1:], size))]


def _stage(graph: LeanGraph, i: int, tap: str, prev: str | None, d: int, size: tuple[int, ...]) -> str:
    c, *hw = graph.node(tap).out_shape
    one_d = len(size) == 1
    new: list[Node] = []
    src = tap
    if tuple(hw) != size:
        f = hw[0] // size[0]
        if all(n == f * s for n, s in zip(hw, size)):
            rule = R.AvgPool(f) if one_d else R.AvgPool2d(f)
        else:
            rule = R.AdaptiveAvgPool(size)
        new.append(Node(graph.unique_name(f"side_{i}_pool"), rule, [src], f"side.{i}.pool"))
        src = new[-1].name
    conv_cls, rule_cls = (nn.Conv1d, R.Conv1d) if one_d else (nn.Conv2d, R.Conv2d)
    new.append(_conv_node(graph, f"side.{i}.proj", rule_cls(1), src, conv_cls(c, d, 1)))
    src = new[-1].name
    if prev is not None:
        new.append(Node(graph.unique_name(f"side_{i}_add"), R.Add(), [prev, src], f"side.{i}.add"))
        src = new[-1].name
    dw = conv_cls(d, d, 3, padding=1, groups=d)
    new.append(_conv_node(graph, f"side.{i}.dw", rule_cls(3, 1, 1, 1, d), src, dw))
    new.append(Node(graph.unique_name(f"side_{i}_relu"), R.ReLU(), [new[-1].name], f"side.{i}.relu"))
    anchor = tap
    for n in new:
        graph.insert_after(anchor, n)
        anchor = n.name
    return new[-1].name


def _conv_node(graph: LeanGraph, module: str, rule: R.Conv2d, src: str, conv: nn.Module) -> Node:
    params = {}
    for role in ("weight", "bias"):
        name = f"{module}.{role}"
        graph.tensors[name] = getattr(conv, role).detach().clone()
        graph.trainable.append(name)
        params[role] = name
    return Node(graph.unique_name(module.replace(".", "_")), rule, [src], module, params)


@register
def side(token: str):
    return Side() if token == "side" else None


side.token = "side"
