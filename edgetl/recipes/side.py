"""`side`: a ladder side network (LST). Taps at the last feature map of each backbone
resolution are average-pooled to the smallest tap resolution, projected by a trainable 1×1
conv, summed into a side stream refined by a trainable 3×3 depthwise conv and ReLU. The side
stream's pooled output joins the backbone's pooled features at the head. The backbone itself
gets no gradient, so nothing of it is kept for backward except the pooled taps."""
from __future__ import annotations

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
            raise RecipeError("'side' needs a backbone with 4-D feature maps before its head")
        channels = sum(graph.node(t).out_shape[0] for t in taps)
        d = self.width or int(min(128, max(8, round(TARGET_FRACTION * ctx.backbone_params / (channels + 10) / 8) * 8)))
        hs, ws = graph.node(taps[-1]).out_shape[1:]
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        try:
            prev = None
            for i, tap in enumerate(taps):
                prev = _stage(graph, i, tap, prev, d, (hs, ws))
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
        ctx.notes["side"] = {"taps": taps, "width": d, "resolution": [hs, ws]}


def _taps(graph: LeanGraph, head: Node) -> list[str]:
    """The last feature map (larger than 1×1) at each spatial resolution before the head, in
    schedule order; 1×1 maps are pooled vectors (e.g. squeeze-excite), not taps."""
    last: dict[tuple[int, int], int] = {}
    nodes = graph.nodes[: graph.nodes.index(head)]
    for i, n in enumerate(nodes):
        if len(n.out_shape) == 3 and n.out_shape[1] * n.out_shape[2] > 1:
            last[tuple(n.out_shape[1:])] = i
    return [nodes[i].name for i in sorted(last.values())][-MAX_TAPS:]


def _stage(graph: LeanGraph, i: int, tap: str, prev: str | None, d: int, hw: tuple[int, int]) -> str:
    c, h, w = graph.node(tap).out_shape
    f = h // hw[0]
    if f < 1 or h // f != hw[0] or w // f != hw[1]:
        raise RecipeError(f"'side': cannot pool tap '{tap}' ({h}x{w}) to {hw[0]}x{hw[1]}")
    new: list[Node] = []
    src = tap
    if f > 1:
        new.append(Node(graph.unique_name(f"side_{i}_pool"), R.AvgPool2d(f), [src], f"side.{i}.pool"))
        src = new[-1].name
    proj = nn.Conv2d(c, d, 1)
    new.append(_conv_node(graph, f"side.{i}.proj", R.Conv2d(1), src, proj))
    src = new[-1].name
    if prev is not None:
        new.append(Node(graph.unique_name(f"side_{i}_add"), R.Add(), [prev, src], f"side.{i}.add"))
        src = new[-1].name
    dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
    new.append(_conv_node(graph, f"side.{i}.dw", R.Conv2d(3, 1, 1, 1, d), src, dw))
    new.append(Node(graph.unique_name(f"side_{i}_relu"), R.ReLU(), [new[-1].name], f"side.{i}.relu"))
    anchor = tap
    for n in new:
        graph.insert_after(anchor, n)
        anchor = n.name
    return new[-1].name


def _conv_node(graph: LeanGraph, module: str, rule: R.Conv2d, src: str, conv: nn.Conv2d) -> Node:
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
