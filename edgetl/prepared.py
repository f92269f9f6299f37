"""prepare(): from a pretrained model and a recipe to a prepared model whose lean training
step can run eagerly (CPU or CUDA) or be exported for a device."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backbones import Backbone, load_backbone
from .errors import EdgeTLError
from .graph import LeanGraph
from .program import Program
from .quant import dequantize_per_channel, quantize_per_channel
from .recipes import PrepareContext, Recipe, parse_recipe
from .rules import Linear
from .trace import trace

FROZEN_DTYPES = ("int8", "fp32")


@dataclass
class PreparedModel:
    graph: LeanGraph
    recipe: Recipe
    name: str
    num_classes: int
    input_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str
    notes: dict = field(default_factory=dict)
    seed: int = 0  # initialisation of the new parts (head, side network)
    stored: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # frozen: (int8, scale) or (fp32,)

    @property
    def trainable(self) -> list[str]:
        return list(self.graph.trainable)

    def frozen(self, name: str, zero: torch.Tensor | None = None) -> torch.Tensor:
        """A frozen tensor as the step uses it: int8 ones are dequantized afresh on each call.
        (`zero`, an exact zero the exported programs use for scheduling, changes nothing here.)"""
        stored = self.stored[name]
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
        }

    def memory(self, batch_size: int, optimizer=None):
        from .memory import analyze

        return analyze(self, batch_size, optimizer)

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
) -> PreparedModel:
    """Trace `model`, fold BatchNorm, put a new `num_classes` head on it and apply `recipe`."""
    recipe = parse_recipe(recipe)
    if frozen_dtype not in FROZEN_DTYPES:
        raise EdgeTLError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got '{frozen_dtype}'")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise EdgeTLError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
    bb = _as_backbone(model)
    size = bb.input_size if input_size is None else input_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise EdgeTLError(f"input_size must be a positive integer, got {size!r}")
    try:
        graph = trace(bb.model, (bb.in_channels, size, size), list(bb.blocks))
    except RuntimeError:
        smallest = _smallest_input_size(bb, size)
        if smallest is None:
            raise
        raise EdgeTLError(f"input_size {size} is too small for {bb.name}: its smallest input is "
                          f"{smallest}×{smallest}") from None
    graph.frozen_dtype = frozen_dtype
    head = _find_head(graph, bb.head)
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
    return PreparedModel(graph, recipe, bb.name, num_classes, size, bb.in_channels, tuple(bb.mean), tuple(bb.std),
                         head.name, ctx.notes, seed, stored)


def _smallest_input_size(bb: Backbone, failed: int) -> int | None:
    """The smallest square input the model runs on, if `failed` is too small for it (torch
    refuses a size whose feature maps shrink below a kernel); None if size is not the problem."""
    def runs(n: int) -> bool:
        try:
            with torch.no_grad():
                bb.model.eval()(torch.zeros(1, bb.in_channels, n, n))
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


def _as_backbone(model) -> Backbone:
    if isinstance(model, Backbone):
        return model
    if isinstance(model, str):
        return load_backbone(model)
    if isinstance(model, nn.Module):
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if first is None:
            raise EdgeTLError("the model has no Conv2d or Linear layer")
        in_ch = first.in_channels if isinstance(first, nn.Conv2d) else 1
        return Backbone(name=type(model).__name__, model=model, input_size=32, in_channels=in_ch, num_classes=0,
                        mean=(0.0,) * in_ch, std=(1.0,) * in_ch, head="", pretrained=False, blocks=())
    raise EdgeTLError(f"expected a Backbone, an nn.Module or a model name, got {type(model).__name__}")


def _find_head(graph: LeanGraph, head: str):
    linears = [n for n in graph.nodes if isinstance(n.rule, Linear)]
    if head:
        node = next((n for n in graph.nodes if n.module == head), None)
        if node is None or not isinstance(node.rule, Linear):
            raise EdgeTLError(f"the head '{head}' is not an nn.Linear layer of the model")
    elif linears:
        node = linears[-1]
    else:
        raise EdgeTLError("no classifier head found: the model needs a final nn.Linear")
    if node.name != graph.output:
        raise EdgeTLError(f"the head '{node.module}' must produce the model's output")
    return node


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
