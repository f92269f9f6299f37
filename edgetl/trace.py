"""From a torch nn.Module to a lean graph.

The model is captured with torch.export (non-strict, in eval mode, at a batch of 2): branches that
depend on shapes are specialised, asserts disappear, and `F.*` calls and modules look alike. Each
op goes through the rule registry (`edgetl.rules.registry`). Afterwards BatchNorm is folded into
the preceding conv/linear and zero padding into the following conv.

Two passes, for speed: the exported (training) IR is walked as it is, mapping in-place ops on
activations to their functional forms. Only when it holds an op no builder knows, or an in-place
change of a view, is it decomposed (`run_decompositions`, seconds of fixed cost) to core ATen,
minus the composite ops with lean rules of their own (KEEP_WHOLE), and walked again: in that
finite op set an op without a builder is unsupported.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import operator
import os
import re
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import rules as R
from .errors import EdgeTLError, UnsupportedLayerError
from .graph import INPUT, LeanGraph, Node
from .rules.registry import BATCH, Act, Call, Const, Lowered, Unsupported, builder_for

aten = torch.ops.aten

# Composite ops kept whole by the decomposition, because they have lean rules of their own.
KEEP_WHOLE = (aten.linear.default, aten.hardswish.default, aten.hardsigmoid.default, aten.silu.default,
              aten.hardtanh.default, aten.relu6.default, aten.sigmoid.default, aten.tanh.default,
              aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default, aten.gelu.default,
              aten.softmax.int, aten.matmul.default, aten.scaled_dot_product_attention.default,
              aten.leaky_relu.default, aten.prelu.default, aten.elu.default, aten.selu.default, aten.celu.default,
              aten.softplus.default, aten.mish.default)

# Ops on a parameter alone whose result is still that parameter (moved, broadcast or reshaped):
# it stays a direct parameter that a recipe may train (see rules/param.py).
_PARAM_VIEWS = {aten.expand.default, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
                aten.alias.default, aten.detach.default, aten.clone.default, aten.contiguous.default,
                aten._to_copy.default, aten.to.dtype, aten.lift_fresh_copy.default}
_DTYPE_ONLY = {aten._to_copy.default, aten.to.dtype, aten.lift_fresh_copy.default, aten.alias.default,
               aten.detach.default, aten.clone.default, aten.contiguous.default}
# Ops that gather or rearrange the elements of their first argument (a table indexed by constant
# positions, then viewed and permuted): applied to the positions too, the result stays a gathered
# parameter that a recipe may train (rules/param.py ParamTableAdd).
_GATHERS = _PARAM_VIEWS | {aten.index.Tensor, aten.embedding.default, aten.index_select.default,
                           aten.gather.default, aten.permute.default, aten.transpose.int, aten.t.default,
                           aten.select.int, aten.slice.Tensor, aten.squeeze.dim, aten.squeeze.dims,
                           aten.squeeze.default, aten._unsafe_view.default, aten.flatten.using_ints,
                           aten.unflatten.int, aten.narrow.default}


class _Poison:
    """The output of an unsupported op: whatever depends on it is not reported again."""


_POISON = _Poison()


class CaptureError(EdgeTLError):
    """torch.export could not capture the model at the given input."""


class _NeedsCore(Exception):
    """The training IR holds something only the core ATen pass can handle."""


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int,
          aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.alias.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.narrow.default,
          aten.as_strided.default, aten.unflatten.int, aten.view_as.default, aten.expand_as.default,
          aten.contiguous.default, aten.detach.default, operator.getitem}


def export_model(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """torch.export at a batch of BATCH (the training IR, not decomposed)."""
    example = torch.zeros(BATCH, *input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,), strict=False)
    except Exception as e:  # torch's own message says what in the model it could not capture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture the model at input {tuple(input_shape)}: {first}") from e


def to_core_aten(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        table.pop(op, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ep.run_decompositions(table)


def _functional(op):
    """The functional form of an in-place ATen op (relu_ -> relu), or None."""
    if not getattr(op, "_schema", None) or not op._schema.is_mutable:
        return None
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _where(node: fx.Node) -> str:
    """file:line of the innermost frame of the user's own code that produced `node`; "" when none
    (torch layers called by torch code only, e.g. an nn.Sequential of them: the module path names
    it), never a line inside torch."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    mine = [f for f in frames if not _in_torch(f[0])]
    return f"{mine[-1][0]}:{mine[-1][1]}" if mine else ""


@functools.lru_cache(maxsize=None)
def _in_torch(path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(os.path.dirname(torch.__file__)) + os.sep)


def _module(node: fx.Node) -> tuple[str, str]:
    """(path, class name) of the innermost nn.Module the op ran in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    kind = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", "")
    return path, kind


class _Walker:
    def __init__(self, ep: torch.export.ExportedProgram, core: bool):
        self.ep = ep
        self.core = core  # walking core ATen: an op without a builder is unsupported
        self.nodes: list[Node] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.env: dict[str, Any] = {}
        self.meta: dict[str, torch.Tensor] = {}
        self.taken = {INPUT}
        self.unsupported: list[tuple[fx.Node, str]] = []
        self.output = ""

    # -- placeholders -------------------------------------------------------------------------------
    def placeholder(self, n: fx.Node) -> None:
        sig = self.ep.graph_signature
        params = sig.inputs_to_parameters
        for table, store in ((params, self.ep.state_dict), (sig.inputs_to_buffers, None),
                             (sig.inputs_to_lifted_tensor_constants, self.ep.constants)):
            if n.name in table:
                name = table[n.name]
                value = self.ep.state_dict.get(name) if store is None else store.get(name)
                if value is None:
                    value = self.ep.constants.get(name)
                self.env[n.name] = Const(value.detach(), name, param=table is params)
                return
        if n.name in sig.user_inputs:
            if any(isinstance(v, Act) for v in self.env.values()):
                raise EdgeTLError("the model's forward must take exactly one input tensor")
            shape = tuple(n.meta["val"].shape[1:])
            self.env[n.name] = Act(INPUT, shape)
            self.meta[INPUT] = torch.empty((BATCH, *shape), device="meta")
            return
        raise EdgeTLError(f"internal: placeholder '{n.name}' is neither an input nor a parameter")

    # -- ops ----------------------------------------------------------------------------------------
    def resolve(self, a):
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.resolve(v) for v in a)
        if isinstance(a, dict):
            return {k: self.resolve(v) for k, v in a.items()}
        return a

    def call(self, n: fx.Node) -> None:
        args, kwargs = self.resolve(n.args), self.resolve(n.kwargs)
        if _contains(args, _Poison) or _contains(kwargs, _Poison):
            self.env[n.name] = _POISON
            return
        if n.target is operator.getitem:
            value = args[0][args[1]]
            if value is None and n.users:
                self.fail(n, "it uses the indices of a max pooling")
                return
            self.env[n.name] = value
            return
        target, mutated = n.target, None
        functional = None if self.core else _functional(target)
        if functional is not None:  # x.relu_(): later uses of x see the result
            first = n.args[0]
            if not isinstance(args[0], Act) or not isinstance(first, fx.Node) or first.op != "call_function" \
                    or first.target in _VIEWS:
                raise _NeedsCore()
            target, mutated = functional, first
        if isinstance(args[0] if args else None, _BatchMoved) or _moves_batch_then_splits(n, target, args):
            self.split_moved(n, target, args)
            return
        if not _contains(args, Act) and not _contains(kwargs, Act):
            if not self.core and _functional(target) is not None:
                raise _NeedsCore()
            self.env[n.name] = self.fold(n, args, kwargs)
            return
        builder = builder_for(target)
        if builder is None:
            if not self.core:
                raise _NeedsCore()
            self.fail(n, "no rule for this op")
            return
        val = n.meta.get("val")
        out = tuple(val.shape[1:]) if isinstance(val, torch.Tensor) else None
        module, _ = _module(n)
        try:
            result = builder(Call(target, args, kwargs, out, module, _where(n)))
            self.env[n.name] = value = self.emit(result, n, module)
            if mutated is not None:
                self.env[mutated.name] = value
        except Unsupported as e:
            self.fail(n, str(e))
            return
        if isinstance(value, Act) and out is not None and value.shape != out:
            raise EdgeTLError(f"internal: {n.target} gives {value.shape} in the lean graph, {out} in the model")

    def fold(self, n: fx.Node, args, kwargs):
        """An op on constants only (e.g. a weight reshaped in forward): computed now."""
        plain = _map(lambda v: v.value if isinstance(v, Const) else v, (args, kwargs))
        consts = [v for v in _leaves((args, kwargs)) if isinstance(v, Const)]
        names = [v.name for v in consts if v.name]
        param = n.target in _PARAM_VIEWS and len(consts) == 1 and consts[0].param
        out = n.target(*plain[0], **plain[1])
        gathered = None if param else _gathered(n.target, args, kwargs, plain)
        if gathered is not None and isinstance(out, torch.Tensor):
            return Const(out.detach(), args[0].name, False, *gathered)
        return _map(lambda v: Const(v.detach(), names[0] if names else "", param) if isinstance(v, torch.Tensor)
                    else v, out)

    def split_moved(self, n: fx.Node, target, args) -> None:
        """timm's `qkv.permute(2, 0, 3, 1, 4).unbind(0)`: a permute that moves the batch to the
        second place, only ever split along its new first dim. Each part is a Select of the unpermuted
        tensor followed by the rest of the permutation, so the batch never moves."""
        if target is aten.permute.default:
            self.env[n.name] = _BatchMoved(args[0], [d % (len(args[0].shape) + 1) for d in args[1]])
            return
        moved: _BatchMoved = args[0]
        x, dims = moved.x, moved.dims
        a = dims[0]
        rest = [d if d < a else d - 1 for d in dims[1:]]
        module, _ = _module(n)
        indices = range(x.shape[a - 1]) if target is aten.unbind.int else [args[2] % x.shape[a - 1]]
        out = []
        for i in indices:
            part = self.add(Lowered(R.Select(a - 1, i), [x]), n, module)
            if rest != list(range(len(rest))):
                part = self.add(Lowered(R.Permute(tuple(d - 1 for d in rest[1:])), [part]), n, module)
            out.append(part)
        self.env[n.name] = out if target is aten.unbind.int else out[0]

    def fail(self, n: fx.Node, reason: str) -> None:
        self.unsupported.append((n, reason))
        self.env[n.name] = _POISON

    def emit(self, result, n: fx.Node, module: str):
        if isinstance(result, Lowered):
            return self.add(result, n, module)
        if isinstance(result, (list, tuple)):
            return type(result)(self.emit(r, n, module) for r in result)
        return result

    def add(self, low: Lowered, n: fx.Node, module: str) -> Act:
        base = module.replace(".", "_") or str(n.target).split(".")[1]
        name = base if base not in self.taken else f"{base}_{low.rule.kind}"
        k = 1
        while name in self.taken:
            name, k = f"{base}_{low.rule.kind}_{k}", k + 1
        self.taken.add(name)
        roles = {}
        for role, c in low.params.items():
            tname = c.name or f"{module or name}.{role}"
            while tname in self.tensors and self.tensors[tname] is not c.value:
                tname = f"{tname}_"
            self.tensors[tname] = c.value.detach().clone().float()
            roles[role] = tname
        srcs = [a.name for a in low.inputs]
        shapes = [a.shape for a in low.inputs]
        ws = {r: self.tensors[t].to("meta") for r, t in roles.items()}
        y = low.rule.bind(shapes).compute([self.meta[s] for s in srcs], ws)
        out = tuple(y.shape[1:])
        self.meta[name] = y
        self.nodes.append(Node(name, low.rule, srcs, module, roles))
        return Act(name, out)

    def report(self) -> None:
        if not self.unsupported:
            return
        node, reason = self.unsupported[0]
        path, kind = _module(node)
        op = str(node.target)
        source = [str(getattr(f, "target", "")) for f in node.meta.get("from_node") or []]
        if source and source[0] not in ("", op):  # a composite op the decomposition broke up
            op = f"{op} (from {source[0]})"
        raise UnsupportedLayerError(op, reason, path, kind, _where(node), len(self.unsupported) - 1)

    def run(self) -> list[Node]:
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                self.placeholder(n)
            elif n.op == "call_function":
                self.call(n)
            elif n.op == "output":
                self.finish(n)
            else:
                raise EdgeTLError(f"internal: unexpected {n.op} node in the exported graph")
        return self.nodes

    def finish(self, n: fx.Node) -> None:
        self.report()
        outs = self.resolve(n.args[0])
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        if len(outs) != 1 or not isinstance(outs[0], Act) or outs[0].name == INPUT:
            raise EdgeTLError("the model's forward must return one tensor (the logits)")
        self.output = outs[0].name


def _gathered(target, args, kwargs, plain) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(table, positions) when `target` gathers or rearranges a parameter (or a value already
    gathered from one) by constants only: the same op applied to the element positions."""
    src = args[0] if args else None
    if target not in _GATHERS or not isinstance(src, Const) or not (src.param or src.pos is not None) \
            or any(isinstance(v, Const) and v.param for v in _leaves((args[1:], kwargs))):
        return None
    table = src.table if src.pos is not None else src.value
    pos = src.pos if src.pos is not None else torch.arange(table.numel()).reshape(table.shape)
    if target in _DTYPE_ONLY:
        return table, pos
    rest = plain[0][1:]
    return table, target(pos, *rest, **{k: v for k, v in plain[1].items() if k not in ("dtype", "memory_format")})


class _BatchMoved:
    """A permute that moved the batch dim (see _Walker.split_moved): no value of the lean graph."""

    def __init__(self, x: Act, dims: list[int]):
        self.x, self.dims = x, dims


def _splits_first_dim(user: fx.Node) -> bool:
    if user.target is aten.unbind.int:
        return (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) == 0
    return user.target is aten.select.int and user.args[1] == 0


def _moves_batch_then_splits(n: fx.Node, target, args) -> bool:
    if target is not aten.permute.default or not isinstance(args[0], Act):
        return False
    ndim = len(args[0].shape) + 1
    dims = [d % ndim for d in args[1]]
    return dims[0] != 0 and dims[1] == 0 and bool(n.users) and all(_splits_first_dim(u) for u in n.users)


def _leaves(v):
    if isinstance(v, (list, tuple)):
        for e in v:
            yield from _leaves(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _leaves(e)
    else:
        yield v


def _contains(v, kind) -> bool:
    return any(isinstance(e, kind) for e in _leaves(v))


def _map(fn, v):
    if isinstance(v, (list, tuple)):
        return type(v)(_map(fn, e) for e in v)
    if isinstance(v, dict):
        return {k: _map(fn, e) for k, e in v.items()}
    return fn(v)


_CACHE: OrderedDict[str, tuple[nn.Module, LeanGraph]] = OrderedDict()
_CACHE_SIZE = 8
_PLAIN = (int, float, bool, str, tuple, list, type(None))


def _fingerprint(model: nn.Module, input_shape: tuple[int, ...], blocks) -> str:
    """What the traced graph depends on: each module's class (by identity), its plain attributes
    by value and any other (functions, objects) by identity, every parameter and buffer's bytes,
    the input shape and the blocks. The cache keeps the model alive, so identities stay unique."""
    h = hashlib.sha1(repr((tuple(input_shape), tuple(blocks or ()))).encode())
    for name, m in model.named_modules():
        attrs = sorted((k, repr(v) if isinstance(v, _PLAIN) else f"id:{id(v)}") for k, v in vars(m).items()
                       if k not in ("training", "_parameters", "_buffers", "_modules") and not isinstance(v, dict))
        hooks = [id(f) for d in ("_forward_hooks", "_forward_pre_hooks") for f in getattr(m, d, {}).values()]
        h.update(repr((name, id(type(m)), type(m).__qualname__, attrs, hooks)).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(repr((name, t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trace(model: nn.Module, input_shape: tuple[int, ...], blocks: list[str] | None = None) -> LeanGraph:
    """Trace `model` (eval semantics) into a lean graph with BatchNorm folded into convs.
    torch.export takes seconds, so graphs are memoised by what they depend on (`_fingerprint`);
    each call returns its own copy."""
    key = _fingerprint(model, input_shape, blocks)
    if key not in _CACHE:
        _CACHE[key] = (model, _trace(model, input_shape, blocks))
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return copy.deepcopy(_CACHE[key][1])


def _trace(model: nn.Module, input_shape: tuple[int, ...], blocks: list[str] | None) -> LeanGraph:
    ep = export_model(model.eval(), tuple(input_shape))
    with torch.no_grad():
        try:
            walker = _Walker(ep, core=False)
            nodes = walker.run()
        except _NeedsCore:
            walker = _Walker(to_core_aten(ep), core=True)
            nodes = walker.run()
    graph = LeanGraph(nodes=nodes, input_shape=tuple(input_shape), tensors=walker.tensors, output=walker.output,
                      blocks=list(blocks or []))
    _fold_batchnorm(graph)
    _fold_padding(graph)
    _add_missing_biases(graph)
    _pool_before_activation(graph)
    graph.infer_shapes()
    _assign_blocks(graph)
    return graph


def _remove(graph: LeanGraph, node: Node, replacement: str) -> None:
    graph.nodes.remove(node)
    for other in graph.nodes:
        other.inputs = [replacement if i == node.name else i for i in other.inputs]
    if graph.output == node.name:
        graph.output = replacement


def _fold_batchnorm(graph: LeanGraph) -> None:
    uses = graph.consumers()
    for bn in [n for n in graph.nodes if getattr(n.rule, "from_batchnorm", False)]:
        src = bn.inputs[0]
        conv = next((n for n in graph.nodes if n.name == src), None)
        if conv is None or not isinstance(conv.rule, (R.Conv2d, R.Linear)) or len(uses[src]) != 1:
            continue
        scale = graph.tensors.pop(bn.params["weight"])
        shift = graph.tensors.pop(bn.params["bias"])
        w = graph.tensors[conv.params["weight"]]
        graph.tensors[conv.params["weight"]] = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        bias_name = conv.params.get("bias") or f"{conv.module or conv.name}.bias"
        b = graph.tensors.get(bias_name, torch.zeros_like(scale))
        graph.tensors[bias_name] = b * scale + shift
        conv.params["bias"] = bias_name
        _remove(graph, bn, conv.name)


def _fold_padding(graph: LeanGraph) -> None:
    uses = graph.consumers()
    for pad in [n for n in graph.nodes if isinstance(n.rule, R.Pad)]:
        users = uses[pad.name]
        if len(users) != 1 or len(pad.rule.pads) != 4 or pad.rule.value != 0:
            continue
        conv = graph.node(users[0])
        if not isinstance(conv.rule, R.Conv2d):
            continue
        l, r, t, b = pad.rule.pads
        ct, cb, cl, cr = conv.rule.pads
        conv.rule = conv.rule.replace(pads=(ct + t, cb + b, cl + l, cr + r))
        conv.inputs = [pad.inputs[0]]
        graph.nodes.remove(pad)


def _pool_before_activation(graph: LeanGraph) -> None:
    """A ReLU or ReLU6 whose only user is a max pool runs after it instead: max pooling commutes with
    a non-decreasing function, and the gradients agree with torch's (where a clamped value wins a
    window, both orders give it gradient 0: these activations' gradients are 0 at the bounds). The
    activation then keeps its mask at the pooled size and its backward runs there, so the pool's
    backward gives the conv's output gradient directly (mnist_cnn batch 1 `bias+mask`: one
    28x28x32 float gradient less at the step's peak)."""
    uses = graph.consumers()
    for pool in [n for n in graph.nodes if isinstance(n.rule, R.MaxPool)]:
        act = next((n for n in graph.nodes if n.name == pool.inputs[0]), None)
        if act is None or type(act.rule) not in (R.ReLU, R.ReLU6) or uses[act.name] != [pool.name]:
            continue
        for other in graph.nodes:
            other.inputs = [act.name if i == pool.name else i for i in other.inputs]
        pool.inputs, act.inputs = list(act.inputs), [pool.name]
        i, j = graph.nodes.index(act), graph.nodes.index(pool)
        graph.nodes[i], graph.nodes[j] = pool, act  # nothing between them reads either
        if graph.output == pool.name:
            graph.output = act.name


def _add_missing_biases(graph: LeanGraph) -> None:
    """Every conv/linear gets a bias (zero when it had none), so the bias recipe can train it."""
    for n in graph.nodes:
        if isinstance(n.rule, (R.Conv2d, R.Linear)) and "bias" not in n.params:
            name = f"{n.module or n.name}.bias"
            graph.tensors[name] = torch.zeros(graph.tensors[n.params["weight"]].shape[0])
            n.params["bias"] = name


def _assign_blocks(graph: LeanGraph) -> None:
    """Map each node to a block by module-path prefix; without declared blocks each
    parameterized layer is its own block."""
    if not graph.blocks:
        graph.blocks = [n.module or n.name for n in graph.nodes if n.params]
    for n in graph.nodes:
        best = -1
        for i, b in enumerate(graph.blocks):
            if n.module == b or n.module.startswith(b + "."):
                if best < 0 or len(b) > len(graph.blocks[best]):
                    best = i
        n.block = best
