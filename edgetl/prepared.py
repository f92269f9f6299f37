"""prepare(): from a pretrained model and a recipe to a prepared model whose lean training
step can run eagerly (CPU or CUDA) or be exported for a device."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backbones import Backbone, load_backbone
from .errors import EdgeTLError
from .graph import LeanGraph
from .program import Program
from .quant import dequantize_per_channel, quantize_per_channel
from .recipes import PrepareContext, Recipe, parse_recipe
from .graph import INPUT, Node
from .rules import Conv2d, Flatten, GlobalAvgPool, Linear, Mean, Reshape
from .rules.activation import _Activation
from .trace import CaptureError, trace

FROZEN_DTYPES = ("int8", "fp32")


@dataclass
class PreparedModel:
    graph: LeanGraph
    recipe: Recipe
    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str
    notes: dict = field(default_factory=dict)
    seed: int = 0  # initialisation of the new parts (head, side network)
    stored: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # frozen: (int8, scale) or (fp32,)
    head_spec: str = ""  # the head's module as the user named it ("" when found automatically)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) or (C, L)."""
        return tuple(self.graph.input_shape)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int | None:
        """The side of a square (or 1-D) input; None when the sides differ."""
        spatial = set(self.input_shape[1:])
        return spatial.pop() if len(spatial) == 1 else None

    @property
    def trainable(self) -> list[str]:
        return list(self.graph.trainable)

    def frozen(self, name: str, zero: torch.Tensor | None = None, rows: tuple[int, int] | None = None
               ) -> torch.Tensor:
        """A frozen tensor as the step uses it (or its rows [lo, hi)): int8 ones are dequantized
        afresh on each call. (`zero`, an exact zero the exported programs use for scheduling,
        changes nothing here.)"""
        stored = self.stored[name] if rows is None else tuple(t[rows[0]:rows[1]] for t in self.stored[name])
        return dequantize_per_channel(*stored) if len(stored) == 2 else stored[0]

    def initial_params(self) -> dict[str, torch.Tensor]:
        return {t: self.graph.tensors[t].clone() for t in self.graph.trainable}

    def program(self) -> Program:
        return Program(self.graph, self.frozen)

    def summary(self) -> dict:
        total = self.graph.total_params()
        trainable = self.graph.trainable_params()
        return {
            "model": self.name,
            "recipe": self.recipe.text,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_fraction": trainable / total,
            "frozen_dtype": self.graph.frozen_dtype,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "input_shape": list(self.input_shape),
        }

    def memory(self, batch_size: int, optimizer=None, lowering=None):
        """The analytic memory of one step, as `lowering` (default: the onnx target's) runs it."""
        from .memory import analyze

        return analyze(self, batch_size, optimizer, lowering)

    def step_module(self, optimizer=None):
        from .optim import OptimizerConfig
        from .step import LeanStep

        return LeanStep(self, optimizer or OptimizerConfig())


def prepare(
    model: Backbone | nn.Module | str,
    recipe: str | Recipe,
    num_classes: int,
    input_size: int | None = None,
    frozen_dtype: str = "int8",
    seed: int = 0,
    *,
    input_shape: tuple[int, ...] | None = None,
    head: str | None = None,
    traced: dict | None = None,
) -> PreparedModel:
    """Trace `model`, fold BatchNorm, put a new `num_classes` head on it and apply `recipe`.

    The input is `input_shape` per sample, (C, H, W) or (C, L), or a square `input_size` (default:
    the backbone's). `head` names the classifier's module (e.g. "classifier.1") when edgetl
    cannot tell which layer it is. `traced`: a dict kept across calls with the same Backbone object,
    so each input shape is traced once (edgetl plan tries many recipes)."""
    recipe = parse_recipe(recipe)
    if frozen_dtype not in FROZEN_DTYPES:
        raise EdgeTLError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got '{frozen_dtype}'")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise EdgeTLError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
    channels = input_shape[0] if isinstance(input_shape, (tuple, list)) and input_shape else None
    bb = _as_backbone(model, channels if isinstance(channels, int) else None)
    shape = _input_shape(bb, input_size, input_shape)
    key = (id(bb.model), shape)
    try:
        if traced is not None and key in traced:
            graph = copy.deepcopy(traced[key])
        else:
            graph = trace(bb.model, shape, list(bb.blocks))
            if traced is not None:
                traced[key] = copy.deepcopy(graph)
    except (CaptureError, RuntimeError):
        smallest = _smallest_input_size(bb, shape)
        if smallest is None:
            raise
        raise EdgeTLError(f"input_size {shape[1]} is too small for {bb.name}: its smallest input is "
                          f"{smallest}×{smallest}") from None
    graph.frozen_dtype = frozen_dtype
    head_spec = head
    head = find_head(graph, head or bb.head)
    for t in head.params.values():
        graph.tensors.pop(t)
    ctx = PrepareContext(head=head.name, backbone_params=graph.total_params(), seed=seed)
    head.params = {}
    ordered = recipe.ordered()
    for part in ordered:
        if part.kind == "part":
            part.apply(graph, ctx)
    _new_head(graph, head, num_classes, seed)
    for part in ordered:
        if part.kind == "modifier":
            part.apply(graph, ctx)
    graph.infer_shapes()
    stored = {}
    for t, v in graph.tensors.items():
        if t not in graph.trainable:
            stored[t] = quantize_per_channel(v) if graph.is_quantized(t) else (v,)
    return PreparedModel(graph, recipe, bb.name, num_classes, tuple(bb.mean), tuple(bb.std), head.name, ctx.notes,
                         seed, stored, head_spec or "")


def _input_shape(bb: Backbone, input_size, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        if input_size is not None:
            raise EdgeTLError("give input_size or input_shape, not both")
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
        if len(shape) not in (2, 3) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                               for d in shape):
            raise EdgeTLError(f"input_shape must be (C, L) or (C, H, W) of positive integers, got {input_shape!r}")
        if shape[0] != len(bb.mean):
            raise EdgeTLError(f"input_shape has {shape[0]} channels; the model takes {len(bb.mean)}")
        return shape
    if input_size is None and bb.input_shape is not None:
        return tuple(bb.input_shape)
    size = bb.input_size if input_size is None else input_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise EdgeTLError(f"input_size must be a positive integer, got {size!r}")
    return (bb.in_channels, size, size)


def _smallest_input_size(bb: Backbone, shape: tuple[int, ...]) -> int | None:
    """The smallest square input the model runs on, if the square `shape` is too small for it
    (torch refuses a size whose feature maps shrink below a kernel); None if size is not the
    problem or the input is not square."""
    if len(shape) != 3 or shape[1] != shape[2]:
        return None
    c, failed = shape[0], shape[1]

    def runs(n: int) -> bool:
        try:
            with torch.no_grad():
                bb.model.eval()(torch.zeros(1, c, n, n))
            return True
        except RuntimeError:
            return False

    if runs(failed):
        return None
    hi = max(bb.input_size or 1, failed + 1)
    while not runs(hi):
        if hi > 4096:
            return None
        hi *= 2
    lo = failed  # fails; hi runs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


def _as_backbone(model, channels: int | None = None) -> Backbone:
    if isinstance(model, Backbone):
        return model
    if isinstance(model, str):
        return load_backbone(model)
    if isinstance(model, nn.Module):
        from .backbones import wrap_module

        if not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules()):
            raise EdgeTLError("the model has no Conv1d, Conv2d or Linear layer")
        bb = wrap_module(model, type(model).__name__)
        in_ch = channels or bb.in_channels
        if not isinstance(getattr(model, "input_size", None), int) and bb.input_shape is None:
            bb = dataclasses.replace(bb, input_size=32)
        return dataclasses.replace(bb, in_channels=in_ch, mean=(0.0,) * in_ch, std=(1.0,) * in_ch, head="",
                                   blocks=())
    raise EdgeTLError(f"expected a Backbone, an nn.Module or a model name, got {type(model).__name__}")


def find_head(graph: LeanGraph, name: str = "") -> Node:
    """The classifier head: the Linear producing the output, or a 1×1-conv classifier before
    global pooling (squeezenet style: conv1x1 → activation? → global pool → flatten), or the
    layer the user named. A conv classifier is replaced by pool → flatten → Linear (a new Linear
    after the pool: equivalent to a 1×1 conv before it, as pooling is linear, and cheaper); its
    activation goes with it. Returns the head node, whose parameters the caller replaces."""
    out = graph.node(graph.output)
    if name:
        node = next((n for n in reversed(graph.nodes) if n.module == name or n.name == name), None)
        if node is None or not isinstance(node.rule, (Linear, Conv2d)):
            raise EdgeTLError(f"the head '{name}' is not a Linear or 1×1 Conv2d layer of the model")
        if isinstance(node.rule, Linear):
            if node is not out:
                raise EdgeTLError(f"the head '{name}' must produce the model's output")
            return node
        if _conv_classifier(graph) is not node:
            raise EdgeTLError(f"the head '{name}' is a conv, but not a 1×1 conv before the model's final global "
                              "pooling")
        return _conv_head(graph, node)
    if isinstance(out.rule, Linear):
        return out
    conv = _conv_classifier(graph)
    if conv is not None:
        return _conv_head(graph, conv)
    raise EdgeTLError("no classifier head found: the model's output comes from neither a Linear layer nor a 1×1 "
                      "conv before global pooling; name the head, e.g. prepare(..., head=\"classifier.1\")")


def _conv_classifier(graph: LeanGraph) -> Node | None:
    """conv1x1 → activation? → global pool → flatten? → output, each used once; else None."""
    uses = graph.consumers()
    node = graph.node(graph.output)
    if isinstance(node.rule, (Flatten, Reshape)) and len(node.out_shape) == 1:
        node = graph.node(node.inputs[0])
    pooled = isinstance(node.rule, GlobalAvgPool) or (
        isinstance(node.rule, Mean) and node.in_shapes and node.rule.dims == tuple(range(1, len(node.in_shapes[0]))))
    if not pooled or node.inputs[0] == INPUT:
        return None
    node = graph.node(node.inputs[0])
    if isinstance(node.rule, _Activation) and node.inputs[0] != INPUT and len(uses[node.name]) == 1:
        node = graph.node(node.inputs[0])
    if isinstance(node.rule, Conv2d) and node.rule.kernel == (1, 1) and node.rule.groups == 1 \
            and len(uses[node.name]) == 1:
        return node
    return None


def _conv_head(graph: LeanGraph, conv: Node) -> Node:
    """Replace conv1x1 → act? → pool → flatten? by pool → flatten → a new (param-less) Linear."""
    uses = graph.consumers()
    src = conv.inputs[0]
    drop = [conv]
    nxt = graph.node(uses[conv.name][0])
    if isinstance(nxt.rule, _Activation):
        drop.append(nxt)
        nxt = graph.node(uses[nxt.name][0])
    pool = nxt
    for n in drop:
        for t in n.params.values():
            graph.tensors.pop(t, None)
        graph.nodes.remove(n)
    pool.inputs = [src]
    last = pool
    if graph.output != pool.name:
        last = graph.node(graph.output)
    else:
        flat = Node(graph.unique_name("head_flatten"), Flatten(), [pool.name], pool.module)
        graph.insert_after(pool.name, flat)
        last = flat
    head = Node(graph.unique_name("head"), Linear(), [last.name], conv.module)
    graph.insert_after(last.name, head)
    graph.output = head.name
    return head


def _new_head(graph: LeanGraph, head, num_classes: int, seed: int) -> None:
    graph.infer_shapes(until=head.name)
    in_features = graph.node(head.inputs[0]).out_shape[0] if head.inputs[0] != "input" else graph.input_shape[0]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layer = nn.Linear(in_features, num_classes)
    finally:
        torch.random.set_rng_state(state)
    head.module = "head"
    for role in ("weight", "bias"):
        graph.tensors[f"head.{role}"] = getattr(layer, role).detach().clone()
        head.params[role] = f"head.{role}"
        graph.trainable.append(f"head.{role}")
