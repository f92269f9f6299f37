"""`side`: a ladder side network (LST, Sung et al. 2022) beside a frozen backbone. The backbone
gets no gradient, so nothing of it is kept for backward except what the side network reads (its
taps). Taps are picked by what the graph has; a hybrid (MobileViT) gets both ladders:

- feature maps, (C, H, W) or (C, L) (channels first; found by following each tensor's layout
  through permutes and reshapes): the last map at each backbone resolution is average-pooled to
  the smallest tap resolution (adaptively when it does not divide), projected by a trainable 1×1
  conv, summed into a side stream refined by a trainable 3×3 depthwise conv and ReLU (1-D convs on
  (C, L) maps), and globally pooled.
- token streams, (..., N, D): the residual stream of transformer blocks (an add a LayerNorm
  reads), tapped after each block (the last such add of each block module; at most MAX_TAPS,
  evenly spaced, the last always in). Each tap is projected by a trainable Linear down to
  d = D / REDUCTION (LST's width reduction) and mixed into the side stream by LST's gate,
  s = g*s + (1-g)*down(tap) with g = sigmoid(gate) trainable; a light block refines it,
  s + Linear(GELU(LayerNorm(s))). A final LayerNorm, then the side tokens are pooled as the model
  pools its own (its class-token select, or its slice and mean; a mean over all tokens when the
  model pools feature maps). Taps whose token grid differs from the last one's (a hierarchical
  transformer's earlier stages) are left out.

Each ladder's pooled output joins the backbone's pooled features at the head (concatenated)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import rules as R
from ..errors import RecipeError
from ..graph import INPUT, LeanGraph, Node
from ..rules.activation import _Activation
from ..rules.norm import _Norm
from ..rules.pool import AdaptiveAvgPool, _Windowed
from ..rules.smooth import _Smooth
from .base import Part, PrepareContext, register

MAX_TAPS = 5
TARGET_FRACTION = 0.02  # feature-map ladder: side parameters as a fraction of the backbone's
REDUCTION = 8  # token ladder: d = D / REDUCTION, as LST
MIN_TOKEN_WIDTH = 4


class Side(Part):
    name = "side"

    def __init__(self, width: int | None = None):
        self.width = width

    def apply(self, graph: LeanGraph, ctx: PrepareContext) -> None:
        head = graph.node(ctx.head)
        maps, tokens = _map_taps(graph, head), _token_taps(graph, head)
        if not maps and not tokens:
            raise RecipeError("'side' needs a backbone with (C, H, W) or (C, L) feature maps or a transformer's "
                              "token stream before its head")
        if tokens and _model_pooling(graph, head, _grid(graph, tokens)):
            maps = []  # a transformer (its maps are the patch embedding): the token ladder alone
        if maps and tokens:  # a hybrid: at most MAX_TAPS over both ladders, evenly spaced
            order = {n.name: i for i, n in enumerate(graph.nodes)}
            both = _evenly(sorted(maps + tokens, key=order.__getitem__), MAX_TAPS)
            maps, tokens = [t for t in maps if t in both], [t for t in tokens if t in both]
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        pooled, notes = [], {"taps": maps + tokens}
        try:
            if maps:
                pooled.append(_map_ladder(graph, head, maps, ctx, self.width, notes))
            if tokens:
                pooled.append(_token_ladder(graph, head, tokens, self.width, notes, first_index=len(maps)))
        finally:
            torch.random.set_rng_state(gen_state)
        cat = Node(graph.unique_name("side_concat"), R.Concat(), [head.inputs[0], *pooled], "side.out")
        graph.nodes.insert(graph.nodes.index(head), cat)
        head.inputs = [cat.name]
        graph.infer_shapes(until=head.name)
        ctx.notes["side"] = notes


# ---- which tensors are feature maps ----------------------------------------------------------------

_KEEPS_LAYOUT = (_Activation, _Smooth, _Norm, R.Identity, R.Add, R.Sub, R.Mul, R.Div, R.Pow, R.Sqrt, R.Rsqrt,
                 R.Affine, R.Pad, R.ParamAdd, R.ParamMul, R.LadderGate)
_MAKES_MAP = (R.Conv2d, R.Conv1d, _Windowed, AdaptiveAvgPool, R.GlobalMaxPool, R.Upsample)


def _layouts(graph: LeanGraph, until: Node) -> dict[str, tuple | None]:
    """Per node before `until`, its output's axes as those of a channels-first map: "c" for a
    channel axis, 0..k-1 for the input's spatial axes in order; None when it is no such map.
    So a channels-last permute of a map is (0, 1, "c"), and permuting back gives ("c", 0, 1)."""
    k = len(graph.input_shape) - 1
    spatial = tuple(range(k))
    out: dict[str, tuple | None] = {INPUT: ("c", *spatial) if k else None}
    for n in graph.nodes[: graph.nodes.index(until)]:
        ins = [out.get(i) for i in n.inputs]
        rule, rank, lay = n.rule, len(n.out_shape), None
        if isinstance(rule, _MAKES_MAP):
            lay = ("c", *spatial) if rank == k + 1 else None
        elif isinstance(rule, _KEEPS_LAYOUT) or (isinstance(rule, R.Concat) and ins[0] is not None
                                                 and ins[0][rule.dim] == "c"):
            lay = ins[0] if ins[0] is not None and all(i == ins[0] for i in ins) else None
        elif isinstance(rule, R.Linear):  # on the last axis: a channels-last map stays one
            lay = ins[0] if ins[0] is not None and ins[0][-1] == "c" else None
        elif isinstance(rule, R.Permute) and ins[0] is not None:
            lay = tuple(ins[0][d] for d in rule.dims)
        elif isinstance(rule, R.Reshape) and ins[0] is not None and k:
            # channels split or merged in front of unchanged spatial axes (a channel shuffle)
            src = n.in_shapes[0]
            if ins[0][-k:] == spatial and all(a == "c" for a in ins[0][:-k]) and n.out_shape[-k:] == src[-k:]:
                lay = ("c",) * (rank - k) + spatial
        if lay is not None and len(lay) != rank:
            lay = None
        out[n.name] = lay
    return out


def _map_taps(graph: LeanGraph, head: Node) -> list[str]:
    """The last channels-first feature map (larger than 1×1) at each spatial resolution before the
    head, in schedule order (the last MAX_TAPS); 1×1 maps are pooled vectors (e.g. squeeze-excite),
    not taps, and maps that grow again are left out (the taps must pool down to the last one)."""
    k = len(graph.input_shape) - 1
    cf = ("c", *range(k))
    layouts = _layouts(graph, head)
    last: dict[tuple[int, ...], int] = {}
    nodes = graph.nodes[: graph.nodes.index(head)]
    for i, n in enumerate(nodes):
        if layouts[n.name] == cf and math.prod(n.out_shape[1:]) > 1:
            last[tuple(n.out_shape[1:])] = i
    taps = [nodes[i].name for i in sorted(last.values())][-MAX_TAPS:]
    size = graph.node(taps[-1]).out_shape[1:] if taps else ()
    return [t for t in taps if all(a >= b for a, b in zip(graph.node(t).out_shape[1:], size))]


# ---- which tensors are a transformer's token stream ------------------------------------------------

def _token_taps(graph: LeanGraph, head: Node) -> list[str]:
    """The residual stream after each transformer block: of the adds whose output a LayerNorm over
    its last axis reads (pre-norm blocks, and the final norm), the last one of each module, of the
    last one's token grid, at most MAX_TAPS evenly spaced."""
    nodes = graph.nodes[: graph.nodes.index(head)]
    layouts = _layouts(graph, head)
    k = len(graph.input_shape) - 1
    normed = {n.inputs[0] for n in nodes if isinstance(n.rule, R.LayerNorm) and len(n.rule.shape) == 1}
    last: dict[str, str] = {}
    for n in nodes:
        if (isinstance(n.rule, R.Add) and n.name in normed and len(n.out_shape) >= 2
                and layouts[n.name] != ("c", *range(k))):
            last.pop(n.module or n.name, None)  # re-insert: dict order follows each module's last add
            last[n.module or n.name] = n.name
    taps = list(last.values())
    if not taps:
        return []
    grid = graph.node(taps[-1]).out_shape[:-1]
    return _evenly([t for t in taps if graph.node(t).out_shape[:-1] == grid], MAX_TAPS)


def _evenly(items: list[str], m: int) -> list[str]:
    """At most m of `items`, evenly spaced, the last one always in."""
    n = len(items)
    if n <= m:
        return items
    return [items[round((j + 1) * n / m) - 1] for j in range(m)]


# ---- the two ladders -------------------------------------------------------------------------------

def _map_ladder(graph: LeanGraph, head: Node, taps: list[str], ctx: PrepareContext, width: int | None,
                notes: dict) -> str:
    channels = sum(graph.node(t).out_shape[0] for t in taps)
    d = width or int(min(128, max(8, round(TARGET_FRACTION * ctx.backbone_params / (channels + 10) / 8) * 8)))
    size = tuple(graph.node(taps[-1]).out_shape[1:])
    prev = None
    for i, tap in enumerate(taps):
        prev = _map_stage(graph, i, tap, prev, d, size)
    gap = Node(graph.unique_name("side_gap"), R.GlobalAvgPool(), [prev], "side.out")
    flat = Node(graph.unique_name("side_flat"), R.Flatten(), [gap.name], "side.out")
    idx = graph.nodes.index(head)
    graph.nodes[idx:idx] = [gap, flat]
    notes.update(width=d, resolution=list(size))
    return flat.name


def _map_stage(graph: LeanGraph, i: int, tap: str, prev: str | None, d: int, size: tuple[int, ...]) -> str:
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
    new.append(_layer_node(graph, f"side.{i}.proj", rule_cls(1), src, conv_cls(c, d, 1)))
    src = new[-1].name
    if prev is not None:
        new.append(Node(graph.unique_name(f"side_{i}_add"), R.Add(), [prev, src], f"side.{i}.add"))
        src = new[-1].name
    dw = conv_cls(d, d, 3, padding=1, groups=d)
    new.append(_layer_node(graph, f"side.{i}.dw", rule_cls(3, 1, 1, 1, d), src, dw))
    new.append(Node(graph.unique_name(f"side_{i}_relu"), R.ReLU(), [new[-1].name], f"side.{i}.relu"))
    _insert_chain(graph, tap, new)
    return new[-1].name


def _token_ladder(graph: LeanGraph, head: Node, taps: list[str], width: int | None, notes: dict,
                  first_index: int) -> str:
    shape = graph.node(taps[-1]).out_shape
    d = width or max(MIN_TOKEN_WIDTH, round(shape[-1] / REDUCTION))
    prev = None
    for j, tap in enumerate(taps):
        prev = _token_stage(graph, first_index + j, tap, prev, d)
    norm = _layer_node(graph, "side.norm", R.LayerNorm((d,)), prev, nn.LayerNorm(d))
    pool = _token_pool(graph, head, tuple(shape[:-1]), d)
    idx = graph.nodes.index(head)
    graph.nodes.insert(idx, norm)
    chain = [norm]
    for r in pool:
        chain.append(Node(graph.unique_name("side_pool"), r, [chain[-1].name], "side.out"))
        graph.nodes.insert(graph.nodes.index(head), chain[-1])
    notes.update(token_width=d, token_grid=list(shape[:-1]), token_pooling=[r.describe() for r in pool])
    return chain[-1].name


def _token_stage(graph: LeanGraph, i: int, tap: str, prev: str | None, d: int) -> str:
    dim = graph.node(tap).out_shape[-1]
    new = [_layer_node(graph, f"side.{i}.down", R.Linear(), tap, nn.Linear(dim, d))]
    if prev is not None:
        gate = Node(graph.unique_name(f"side_{i}_gate"), R.LadderGate(), [prev, new[-1].name], f"side.{i}.gate",
                    {"gate": _new_tensor(graph, f"side.{i}.gate", torch.zeros(1))})
        new.append(gate)
    s = new[-1].name
    new.append(_layer_node(graph, f"side.{i}.norm", R.LayerNorm((d,)), s, nn.LayerNorm(d)))
    new.append(Node(graph.unique_name(f"side_{i}_act"), R.GELU(), [new[-1].name], f"side.{i}.act"))
    new.append(_layer_node(graph, f"side.{i}.fc", R.Linear(), new[-1].name, nn.Linear(d, d)))
    new.append(Node(graph.unique_name(f"side_{i}_add"), R.Add(), [s, new[-1].name], f"side.{i}.add"))
    _insert_chain(graph, tap, new)
    return new[-1].name


def _grid(graph: LeanGraph, taps: list[str]) -> tuple[int, ...]:
    return tuple(graph.node(taps[-1]).out_shape[:-1])


def _token_pool(graph: LeanGraph, head: Node, grid: tuple[int, ...], d: int) -> list[R.Rule]:
    """The model's own token pooling (see `_model_pooling`) when it gives one vector of d from
    side tokens; else a mean over the grid (the model pools something else, e.g. feature maps)."""
    chain = _model_pooling(graph, head, grid)
    if chain and _pooled_shape(chain, (*grid, d)) == (d,):
        return chain
    return [R.Mean(tuple(range(len(grid))))]


def _model_pooling(graph: LeanGraph, head: Node, grid: tuple[int, ...]) -> list[R.Rule]:
    """The selects, slices and means by which the model pools its tokens of `grid` into the head's
    features (walking back through norms), as fresh rules; [] when its features come otherwise."""
    chain: list[R.Rule] = []
    name = head.inputs[0]
    while name != INPUT:
        n = graph.node(name)
        if len(n.out_shape) >= 2 and tuple(n.out_shape[:-1]) == grid:
            break
        if isinstance(n.rule, (R.Select, R.Slice, R.Mean)):
            chain.insert(0, n.rule.replace())
        elif not isinstance(n.rule, (_Norm, R.Identity)):
            chain = []
            break
        name = n.inputs[0]
    else:
        chain = []
    return chain


def _pooled_shape(rules: list[R.Rule], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    x = torch.empty((2, *shape), device="meta")
    try:
        for r in rules:
            x = r.bind([tuple(x.shape[1:])]).compute([x], {})
    except (RuntimeError, IndexError):
        return None
    return tuple(x.shape[1:])


# ---- how onnxruntime runs it -------------------------------------------------------------------------

def backbone_first(graph: LeanGraph) -> list[str]:
    """The forward's nodes in the order onnxruntime runs a side-tuned step: the frozen backbone to its
    end, then the ladder (and what reads it: the head). Its order walks back from the step's outputs,
    and the ladder's last stage reads the last tap, which needs the whole backbone; so every tap lives
    until then, where the graph's order runs each stage right after its tap. Profiled (mnist_cnn `side`
    b32: the 28 x 28 tap alive beside the stem pool's NCHWc copy and output, the step's peak, 6.9 MB).
    Except where the exported step pins a ladder's mask (or q8 code) to the next node with a bias or a
    max pool (`Program.forward`'s exact zeros): that ladder node, and what it reads, runs before it
    (mnist_cnn `side+mask`: the stage of the 28 x 28 tap runs before the stem pool, 6.2 MB traced)."""
    ladder: set[str] = set()
    for n in graph.nodes:
        if n.module == "side" or n.module.startswith("side.") or any(i in ladder for i in n.inputs):
            ladder.add(n.name)
    pinned: dict[str, list[str]] = {}  # node: the ladder nodes whose codes are pinned to it
    pending: list[str] = []
    for n in graph.nodes:
        if pending and ("bias" in n.params or n.rule.kind == "maxpool"):
            pinned[n.name], pending = pending, []
        if n.name in ladder and (getattr(n.rule, "mask", False) or getattr(n.rule, "quant_bits", None)):
            pending.append(n.name)
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    order: list[str] = []
    done: set[str] = set()

    def run_before(names: list[str]) -> None:  # these ladder nodes and the ladder nodes they read
        need, stack = set(), list(names)
        while stack:
            name = stack.pop()
            if name in ladder and name not in done and name not in need:
                need.add(name)
                stack.extend(graph.node(name).inputs)
        order.extend(sorted(need, key=index.__getitem__))
        done.update(need)

    for n in graph.nodes:
        if n.name not in ladder:
            run_before(pinned.get(n.name, []))
            order.append(n.name)
            done.add(n.name)
    order += [n.name for n in graph.nodes if n.name not in done]
    return order


# ---- helpers ---------------------------------------------------------------------------------------

def _insert_chain(graph: LeanGraph, anchor: str, new: list[Node]) -> None:
    for n in new:
        graph.insert_after(anchor, n)
        anchor = n.name


def _new_tensor(graph: LeanGraph, name: str, value: torch.Tensor) -> str:
    graph.tensors[name] = value
    graph.trainable.append(name)
    return name


def _layer_node(graph: LeanGraph, module: str, rule: R.Rule, src: str, layer: nn.Module) -> Node:
    params = {role: _new_tensor(graph, f"{module}.{role}", getattr(layer, role).detach().clone())
              for role in ("weight", "bias") if getattr(layer, role, None) is not None}
    return Node(graph.unique_name(module.replace(".", "_")), rule, [src], module, params)


@register
def side(token: str):
    return Side() if token == "side" else None


side.token = "side"
