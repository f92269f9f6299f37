"""From a torch nn.Module to a lean graph: trace with torch.fx, map each layer to its rule,
fold BatchNorm into the preceding conv and zero padding into the following conv."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import rules as R
from .errors import EdgeTLError, UnsupportedLayerError
from .graph import INPUT, LeanGraph, Node

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
_ACT_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
              F.hardsigmoid: "hardsigmoid"}
_SUPPORTED = ("Conv2d, BatchNorm2d, Linear, ReLU, ReLU6, Hardswish, Hardsigmoid, MaxPool2d/AvgPool2d "
              "(kernel == stride), AdaptiveAvgPool2d, Flatten, Dropout, ZeroPad2d, residual add, mul")


class _Tracer:
    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        self.model = model
        self.gm = fx.symbolic_trace(model)
        self.nodes: list[Node] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # fx node name -> lean node name
        self.meta: dict[str, torch.Tensor] = {INPUT: torch.empty((2, *input_shape), device="meta")}
        self.unsupported: list[tuple[str, str]] = []
        self.output = ""

    def run(self) -> list[Node]:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.alias:
                    raise EdgeTLError("the model's forward must take exactly one input tensor")
                self.alias[n.name] = INPUT
            elif n.op == "output":
                out = n.args[0]
                if not isinstance(out, fx.Node):
                    raise EdgeTLError("the model's forward must return one tensor (the logits)")
                self.output = self.alias.get(out.name, "")
            elif n.op == "get_attr":
                self.unsupported.append((n.target, "parameter used directly in forward"))
            else:
                self.visit(n)
        if self.unsupported:
            raise UnsupportedLayerError(self.unsupported)
        return self.nodes

    def path(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return n.target
        stack = n.meta.get("nn_module_stack") or {}
        return next(reversed(stack), "") if stack else ""

    def src(self, a) -> str:
        if isinstance(a, fx.Node) and a.name in self.alias:
            return self.alias[a.name]
        raise KeyError(a)

    def add(self, n: fx.Node, rule: R.Rule, inputs: list, params: dict[str, torch.Tensor] | None = None,
            name: str | None = None) -> str:
        name = name or n.name
        module = self.path(n)
        roles = {}
        for role, t in (params or {}).items():
            tname = f"{module}.{role}" if module else f"{name}.{role}"
            self.tensors[tname] = t.detach().clone().float()
            roles[role] = tname
        srcs = [self.src(a) for a in inputs]
        rule.bind([tuple(self.meta[s].shape[1:]) for s in srcs])
        ws = {r: self.tensors[t].to("meta") for r, t in roles.items()}
        self.meta[name] = rule.compute([self.meta[s] for s in srcs], ws)
        self.nodes.append(Node(name, rule, srcs, module, roles))
        self.alias[n.name] = name
        return name

    def visit(self, n: fx.Node) -> None:
        try:
            ok = {"call_module": self.module, "call_function": self.function, "call_method": self.method}[n.op](n)
        except KeyError:
            ok = False
        if ok is False:
            what = type(self.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(
                getattr(n.target, "__name__", n.target))
            self.unsupported.append((self.path(n) or n.name, what))
            self._continue_past(n)

    def _continue_past(self, n: fx.Node) -> None:
        """Give an unsupported node a meta output so the layers after it are checked too."""
        def meta(a):
            if isinstance(a, fx.Node):
                return self.meta.get(self.alias.get(a.name, ""), a.name)
            if isinstance(a, (list, tuple)):
                return type(a)(meta(v) for v in a)
            return a

        args, kwargs = meta(n.args), {k: meta(v) for k, v in n.kwargs.items()}
        try:
            if n.op == "call_module":
                out = copy.deepcopy(self.gm.get_submodule(n.target)).to("meta")(*args, **kwargs)
            elif n.op == "call_function":
                out = n.target(*args, **kwargs)
            else:
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception:
            return
        if isinstance(out, torch.Tensor):
            self.alias[n.name] = f"?{n.name}"
            self.meta[f"?{n.name}"] = out

    def module(self, n: fx.Node):
        m = self.gm.get_submodule(n.target)
        x = n.args[0]
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
                return False
            pad = 0 if m.padding == "valid" else m.padding
            rule = R.Conv2d(m.kernel_size, m.stride, pad, m.dilation, m.groups)
            params = {"weight": m.weight} | ({"bias": m.bias} if m.bias is not None else {})
            self.add(n, rule, [x], params)
        elif isinstance(m, nn.BatchNorm2d):
            if not m.track_running_stats or m.running_var is None:
                return False
            scale = (m.weight if m.affine else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
            shift = (m.bias if m.affine else torch.zeros_like(m.running_mean)) - m.running_mean * scale
            rule = R.Affine()
            rule.from_batchnorm = True
            self.add(n, rule, [x], {"weight": scale, "bias": shift})
        elif isinstance(m, nn.Linear):
            params = {"weight": m.weight} | ({"bias": m.bias} if m.bias is not None else {})
            self.add(n, R.Linear(), [x], params)
        elif type(m) in _ACT_MODULES:
            self.add(n, R.ACTIVATIONS[_ACT_MODULES[type(m)]](), [x])
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _square(m.kernel_size)
            s = _square(m.stride if m.stride is not None else m.kernel_size)
            if k is None or k != s or _square(m.padding) != 0 or m.ceil_mode:
                return False
            if isinstance(m, nn.MaxPool2d):
                if _square(m.dilation) != 1:
                    return False
                self.add(n, R.MaxPool2d(k), [x])
            else:
                if m.divisor_override is not None:
                    return False
                self.add(n, R.AvgPool2d(k), [x])
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive_pool(n, x, m.output_size)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return False
            self.add(n, R.Flatten(), [x])
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            self.add(n, R.Identity(), [x])
        elif isinstance(m, nn.ZeroPad2d):
            self.add(n, R.Pad(tuple(m.padding)), [x])
        else:
            return False

    def adaptive_pool(self, n: fx.Node, x, size) -> bool | None:
        c, h, w = self.meta[self.src(x)].shape[1:]
        o = _square(size)
        if o is None:
            return False
        if o == 1:
            self.add(n, R.GlobalAvgPool(), [x])
        elif h == w and h % o == 0:
            self.add(n, R.AvgPool2d(h // o), [x])
        else:
            return False

    def function(self, n: fx.Node):
        f = n.target
        args = n.args
        if f in (operator.add, torch.add, operator.mul, torch.mul):
            if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args) or n.kwargs:
                return False
            self.add(n, R.Add() if f in (operator.add, torch.add) else R.Mul(), list(args))
        elif f in _ACT_FUNCS:
            self.add(n, R.ACTIVATIONS[_ACT_FUNCS[f]](), [args[0]])
        elif f is torch.flatten:
            if _arg(n, 1, "start_dim", 0) != 1 or _arg(n, 2, "end_dim", -1) != -1:
                return False
            self.add(n, R.Flatten(), [args[0]])
        elif f is torch.cat:
            if _arg(n, 1, "dim", 0) != 1:
                return False
            self.add(n, R.Concat(), list(args[0]))
        elif f is F.dropout:
            self.add(n, R.Identity(), [args[0]])
        elif f is F.adaptive_avg_pool2d:
            return self.adaptive_pool(n, args[0], args[1])
        elif f is getattr:  # x.shape
            self.alias[n.name] = "shape"
        elif f is operator.getitem and self.alias.get(getattr(args[0], "name", ""), "") == "shape":
            self.alias[n.name] = "size"
        else:
            return False

    def method(self, n: fx.Node):
        name, args = n.target, n.args
        if name == "size":
            self.alias[n.name] = "size"
        elif name in ("view", "reshape"):
            shape = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else tuple(args[1])
            if len(shape) == 2 and shape[1] == -1 and (shape[0] == -1 or getattr(shape[0], "name", None) in self.alias):
                self.add(n, R.Flatten(), [args[0]])
            else:
                return False
        elif name == "flatten":
            if _arg(n, 1, "start_dim", 0) != 1 or _arg(n, 2, "end_dim", -1) != -1:
                return False
            self.add(n, R.Flatten(), [args[0]])
        elif name == "contiguous":
            self.add(n, R.Identity(), [args[0]])
        elif name in ("relu", "hardswish", "hardsigmoid"):
            self.add(n, R.ACTIVATIONS[name](), [args[0]])
        elif name == "mean":
            dims = _arg(n, 1, "dim", None)
            if dims is None or sorted(d % 4 for d in dims) != [2, 3]:
                return False
            pooled = self.add(n, R.GlobalAvgPool(), [args[0]], name=f"{n.name}_pool")
            if not _arg(n, 2, "keepdim", False):
                rule = R.Flatten()
                rule.bind([tuple(self.meta[pooled].shape[1:])])
                self.meta[n.name] = rule.compute([self.meta[pooled]], {})
                self.nodes.append(Node(n.name, rule, [pooled], self.path(n)))
                self.alias[n.name] = n.name
        else:
            return False


def _square(v) -> int | None:
    if isinstance(v, int):
        return v
    v = tuple(v)
    return v[0] if len(v) == 2 and v[0] == v[1] and v[0] is not None else None


def _arg(n: fx.Node, pos: int, key: str, default):
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(key, default)


def trace(model: nn.Module, input_shape: tuple[int, ...], blocks: list[str] | None = None) -> LeanGraph:
    """Trace `model` (eval semantics) into a lean graph with BatchNorm folded into convs."""
    with torch.no_grad():
        t = _Tracer(model.eval(), input_shape)
        nodes = t.run()
    graph = LeanGraph(nodes=nodes, input_shape=tuple(input_shape), tensors=t.tensors, output=t.output,
                      blocks=list(blocks or []))
    _fold_batchnorm(graph)
    _fold_padding(graph)
    _add_missing_biases(graph)
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
        if conv is None or not isinstance(conv.rule, R.Conv2d) or len(uses[src]) != 1:
            continue
        scale = graph.tensors.pop(bn.params["weight"])
        shift = graph.tensors.pop(bn.params["bias"])
        w = graph.tensors[conv.params["weight"]]
        graph.tensors[conv.params["weight"]] = w * scale.reshape(-1, 1, 1, 1)
        bias_name = conv.params.get("bias") or f"{conv.module or conv.name}.bias"
        b = graph.tensors.get(bias_name, torch.zeros_like(scale))
        graph.tensors[bias_name] = b * scale + shift
        conv.params["bias"] = bias_name
        _remove(graph, bn, conv.name)


def _fold_padding(graph: LeanGraph) -> None:
    uses = graph.consumers()
    for pad in [n for n in graph.nodes if isinstance(n.rule, R.Pad)]:
        users = uses[pad.name]
        if len(users) != 1:
            continue
        conv = graph.node(users[0])
        if not isinstance(conv.rule, R.Conv2d):
            continue
        l, r, t, b = pad.rule.pads
        ct, cb, cl, cr = conv.rule.pads
        conv.rule.pads = (ct + t, cb + b, cl + l, cr + r)
        conv.inputs = [pad.inputs[0]]
        graph.nodes.remove(pad)


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
