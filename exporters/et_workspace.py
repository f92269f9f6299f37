"""XNNPACK's workspace for an ExecuTorch program, modelled from the lowered graph.

ExecuTorch plans every tensor a program creates outside its XNNPACK delegate calls; the values a
delegate call makes and uses only inside it live in XNNPACK's workspace instead, one buffer shared
by all calls of all programs (the runtime's default, `Global` sharing), sized for the call that
needs the most. A call's need is modelled as the most bytes its inner values hold at once, in the
order the call runs them (its inputs and outputs are ExecuTorch's, constants are packed weights),
an elementwise op writing over its input where XNNPACK does, plus the channels-last copies
ExecuTorch's XNNPACK lowering makes where a channels-last op (a convolution, a pooling) reads an
NCHW value or hands a result back. Checked call by call against XNNPACK's own workspace sizes
(EfficientNet-Lite0 64 b8, one workspace per call) and at 224 b8: see BENCHMARKS.md.
"""
from __future__ import annotations

import re

import torch

# XNNPACK writes these ops' output over their input when that input is an inner value of the same
# size read by nothing else (its unary/binary elementwise, copy, softmax and reshape nodes).
IN_PLACE = {"add", "sub", "mul", "div", "hardtanh", "relu", "clamp", "sigmoid", "tanh", "neg", "abs", "sqrt",
            "rsqrt", "exp", "square", "maximum", "minimum", "floor", "ceil", "leaky_relu", "elu", "gelu",
            "view_copy", "_clone_dim_order", "clone", "_softmax", "squeeze_copy", "unsqueeze_copy"}


def _op(node: torch.fx.Node) -> str:
    m = re.search(r"(?:aten|dim_order_ops|quantized_decomposed)[.:]+(\w+)", str(node.target))
    return m.group(1) if m else ""


# The ops ExecuTorch's XNNPACK lowering runs channels-last (its ChannelsLastTaggedReshapePass's
# memory_sensitive_ops_nhwc): an NCHW value they read is first copied channels-last; other ops keep
# their input's layout; a channels-last result leaving the call is copied back to NCHW.
NHWC = {"convolution", "upsample_bilinear2d", "mean", "max_pool2d", "max_pool2d_with_indices", "amax", "max",
        "avg_pool2d", "prelu"}


def _rank(node: torch.fx.Node) -> int:
    v = node.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _nbytes(node: torch.fx.Node) -> int:
    v = node.meta.get("val")
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _channels_last(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and _op(n) in NHWC


def _layouts(ops: list[torch.fx.Node], inputs: list[torch.fx.Node]) -> tuple[dict, dict]:
    """Each value's layout (True: channels-last) as ExecuTorch's XNNPACK lowering assigns it, and for
    each NCHW value copied channels-last, the ops that read the copy: a channels-last op's NCHW
    input, and the NCHW inputs of an op whose 4-D inputs come in both layouts (all made channels-last)."""
    nhwc = dict.fromkeys(inputs, False)
    readers: dict = {}
    for n in ops:
        vals = [a for a in n.all_input_nodes if a in nhwc]
        ins = [a for a in vals if _rank(a) == 4]
        if _channels_last(n):
            nhwc[n] = True
        else:
            nhwc[n] = any(nhwc[a] for a in ins)
            if len(ins) < len(vals):
                ins = []  # a non-4-D input cannot be made channels-last: no copies counted
        if nhwc[n]:
            for a in ins:
                if not nhwc[a]:
                    readers.setdefault(a, set()).add(n)
    return nhwc, readers


def peak_bytes(ops: list[torch.fx.Node], inputs: list[torch.fx.Node], outputs: set[torch.fx.Node]) -> int:
    """The most bytes a delegate call running `ops` (in order) holds inside at once. `inputs` (the
    values it reads from ExecuTorch, NCHW) and `outputs` (those it hands back, NCHW) are
    ExecuTorch's; inside: each value by its lifetime, an elementwise op writing over its single-use
    input, and the channels-last copies the lowering inserts: of an NCHW value read channels-last
    (made right after the value, an input's at the call's start; alive until its last reader, the
    value itself until its last NCHW reader; a dequantized value's copy is of its int8 source and
    lives as long as the value), and of a channels-last result leaving the call (the result alive
    until its last use inside, else copied out at once)."""
    nhwc, readers = _layouts(ops, inputs)
    last: dict = {}  # a value's, or ("copy", value)'s, last use (-1: dies as soon as made)
    for i, n in enumerate(ops):
        for a in n.all_input_nodes:
            if n in readers.get(a, ()):
                last["copy", a] = i
            else:
                last[a] = i
    for a in readers:
        if _op(a) == "dequantize_per_tensor":  # int8 copy, converted channels-last: the value is the convert
            last[a] = last["copy", a] = max(last.get(a, -1), last["copy", a])
        else:
            last.setdefault(a, -1)
    live = peak = 0
    alive: dict = {}  # an inner value, or ("copy", value) for a value's channels-last copy -> bytes

    def made(key, size: int) -> None:
        nonlocal live, peak
        alive[key] = size
        live += size
        peak = max(peak, live)

    def copy_of(a) -> None:
        src = a.args[0] if _op(a) == "dequantize_per_tensor" and isinstance(a.args[0], torch.fx.Node) else a
        made(("copy", a), _nbytes(src))

    def free(i: int) -> None:
        nonlocal live
        for k in [k for k in alive if last.get(k, -1) <= i]:
            live -= alive.pop(k)

    for a in inputs:
        if a in readers:
            copy_of(a)
    for i, n in enumerate(ops):
        size = _nbytes(n)
        reused = next((a for a in n.all_input_nodes if a in alive and len(a.users) == 1 and alive[a] == size
                       and a not in readers), None) if _op(n) in IN_PLACE else None
        if n in outputs and not (nhwc[n] and _rank(n) == 4 and n in last):
            if nhwc[n] and _rank(n) == 4 and reused is None:
                peak = max(peak, live + size)  # the channels-last result, copied out at once
            # else written over its input, or in ExecuTorch's NCHW output itself
        elif n in last or n in readers:
            if reused is not None:
                alive[n] = alive.pop(reused)
            else:
                made(n, size)
        if n in readers:
            copy_of(n)
        free(i)
    return peak


def inner_peak_bytes(graph: torch.fx.Graph, user_inputs: set[str] | None = None) -> int:
    """`peak_bytes` of one lowered delegate graph: its inputs are the placeholders named in
    `user_inputs` (None: every placeholder; the others are constants, packed weights)."""
    nodes = list(graph.nodes)
    outputs = {a for a in nodes[-1].args[0] if isinstance(a, torch.fx.Node)} if nodes[-1].op == "output" else set()
    inputs = [n for n in nodes if n.op == "placeholder" and (user_inputs is None or n.name in user_inputs)]
    return peak_bytes([n for n in nodes if n.op == "call_function"], inputs, outputs)


def delegate_inner_bytes(et) -> list[int]:
    """Each XNNPACK delegate call's modelled workspace need, in program order."""
    gm = et.exported_program().graph_module
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate":
            ep = getattr(gm, node.args[0].target).original_module
            out.append(inner_peak_bytes(ep.graph_module.graph, set(ep.graph_signature.user_inputs)))
    return out
