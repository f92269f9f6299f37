"""The `executorch` target: the lean step as one ExecuTorch program (`train_step.pte`) and the
eval program (`eval.pte`), both memory-planned with static shapes (batch = the bundle's batch).

Trainable parameters and optimizer state are program inputs; the new values are outputs, as in
the `onnx` target. With `delegate=True` (the default) the frozen compute is lowered to XNNPACK:

* XNNPACK takes a conv (or linear) only when its weight is a program constant, so for this target
  frozen weights are stored in the program as fp32 constants, dequantized from int8 at export
  time (run-time dequantization would leave every conv on the slow portable kernels). Derived
  constants (the flipped kernels of the backward's input-gradient convs) are folded at export.
  The files still store them int8: each fp32 constant blob that is exactly int8 per channel is
  written as int8 + scales and the device restores the program byte for byte before loading it
  (`edgetl.runtime.backends.executorch_q8`, sha256-checked): ~0.27x the fp32 program.
  XNNPACK packs a conv's constant weight as fp32 (it has no conv with fp32 activations and int8
  weights), but a linear's dequantize -> linear as int8 (f32_qc8w): frozen 1x1 convs with few
  positions per input channel run as linears over the channels-last view, forward and input
  gradient, their weights int8 in the program and in XNNPACK (`Lowering.int8_pointwise_linear`), and
  frozen linear layers, LoRA ones included, read their int8 weights so too (`Lowering.int8_frozen_linear`).
* A trainable bias of a frozen-weight conv/linear is emitted as a separate add after the
  bias-free op, so it is a plain program input, never part of a delegated op (XNNPACK bakes
  *constant* biases into its packed weights; in ExecuTorch's joint-graph flow that silently
  freezes them). Measured: with the bias inside the conv XNNPACK also trains correctly here
  (the bias is an input, not a constant), but the separate add is faster.
* `g * mask.float()` in the masked backward is rewritten to `where(mask, g, 0)` (exact), and each
  interval mask lo < v < hi so applied to `g · mask` (`masks_as_int8`, exact): ExecuTorch's kernels
  for bool tensors (comparisons, `where`, bool casts) take a slow generic path, so the 0/1 mask is
  made by float ops XNNPACK runs, kept as int8 (1 byte, as the bool) and multiplied in XNNPACK.
* A max pool that trains through is float arithmetic XNNPACK runs, its kept positions int8 (`Lowering.
  max_pool_in_arithmetic`, exact, ties to the first maximum): its running-max selects and backward `eq` +
  `where` were ~65% of mnist_cnn's `bias+mask` step on the bool kernels (b32: 52 -> 17 ms, BENCHMARKS.md task C).
* The memory plan is the smaller of ExecuTorch's greedy one and a best-fit one (`et_memory_plan`).
* TF-same (asymmetric) conv pads live in the conv (symmetric padding, zero kernel taps) and a strided
  conv's input gradient is one ConvTranspose over the zero-row-shifted gradient, not cropped (exact;
  `Lowering.pads_in_kernel`, `shifted_strided_input_grad`): the pad and the crop each held a 112x112
  value twice in XNNPACK's shared workspace (Lite0 224 b8: 74.8 MiB; see BENCHMARKS.md, task U). A depthwise
  kernel the zero taps would take past XNNPACK's 25-tap one-pass kernels (a 5x5 made 6x6) keeps an explicit
  pad instead (`Lowering.pads_in_kernel_max_depthwise_taps`; BENCHMARKS.md, task E).
* A strided depthwise conv's input gradient is one stride-1 depthwise conv with the flipped kernel over
  the gradient with zeros inserted (`Lowering.zero_inserted_depthwise_input_grad`, exact): XNNPACK runs a
  depthwise ConvTranspose as a deconvolution with one channel per group (BENCHMARKS.md, task A). Where its
  zero-inserted gradient is over 32 MiB (Lite0 224 b8's 112² one), by batch halves, each its own XNNPACK call,
  joined by ExecuTorch's cat (`Lowering.zero_inserted_split_bytes`, `batch_cat`): XNNPACK's workspace, sized by
  that call, 82.7 -> 45.9 MiB, the memory plan +27.6 MiB, the whole process -9 MiB (BENCHMARKS.md, task H).
  Since task K2 the parts are not joined but carried on (`Lowering.batch_parts_carried`): each part runs the
  mask, the bias sum and the input gradients down to the stem in one call of its own, its int8 masks sliced by
  ExecuTorch (`masks_as_int8`), no cat: the plan 89.2 -> 61.5 MiB, the step -7%; and by parts of at most 10 MiB
  (not 32), -10% against main, the whole process 157 -> 131 MiB (BENCHMARKS.md, task K2).
* The memory plan follows the step as written: delegates are cut where their outputs are used
  outside them (`split_at_outside_uses`: else the whole forward is one XNNPACK call whose outputs,
  every activation a mask is made from, are alive at once) and the written order is restored
  after lowering (`restore_program_order`: XNNPACK's lowering re-sorts the graph breadth-first).
  Without both, `bias+mask` had the same plan as `bias` (EfficientNet-Lite0 64×64 b8: 17.6 MB
  both; now 17.2 and 8.4 MB).

With `delegate=False` only ExecuTorch's own kernels are used and int8 weights stay int8 in the
program, dequantized where they are used (small file, ~50x slower step).
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetl.interpret import computing, interpret, weights_from
from edgetl.lowering import Lowering
from edgetl.quant import SMALL_INT8, decomposed_quant_ops
from edgetl.runtime.backends.executorch_q8 import pack
from edgetl.runtime.targets import EXECUTORCH
from edgetl.step import LeanEval, LeanStep

from .et_fast import lazy_recompiles, materialize_cia_ops_once, shared_provenance
from .et_memory_plan import memory_planning_pass
from .et_retrace import skip_identity_decompositions, skip_identity_retraces
from .et_workspace import delegate_inner_bytes
from .lora import LORA_FILE, merged_model, write_lora_file

INFERENCE_FILE = "inference.pte"


# What ExecuTorch needs from the step, with XNNPACK and without: it runs the step as written (no
# schedule pins); with XNNPACK, a trainable bias of a frozen-weight linear is a separate add, so the
# delegated op has no bias to bake into its packed weights (the conv rule always adds its bias),
# asymmetric conv pads are neither a pad op nor a crop (each held a value twice in XNNPACK's workspace)
# but zero kernel taps, up to XNNPACK's one-pass 25 taps (a larger kernel takes a pad inside its call),
# a strided depthwise conv's input gradient is a depthwise conv over the zero-inserted gradient (XNNPACK's
# depthwise ConvTranspose is slow; a large one by batch parts, each carried on through the per-sample rules that
# follow, one call per part, no cat), a conv with a computed
# kernel is written as matmuls, which XNNPACK takes with computed operands, and a max pooling that trains
# through is float arithmetic XNNPACK runs, no bool op, and a conv bias's gradient of at most 16 MiB is summed
# by XNNPACK (two means). Larger ones, and all without XNNPACK, are summed on ExecuTorch's own kernels, over
# the batch first: at Lite0 224 b8 its 112x112 gradients grew XNNPACK's workspace (82.7 -> 110.3 MiB). Its
# 56x56 ones grew ExecuTorch's plan by 23.6 MB before the 112x112 input gradient went by batch halves; that
# plan's peak (the halves and their cat) covered them: 16 MiB added 0.5 MiB to the whole process for 8-9%
# of the step. BENCHMARKS.md, tasks F (session 9), I and J. Since task K2 the strided depthwise input gradients'
# batch parts are carried on, each through its layers' masks, bias sums and input gradients in one call, and
# made smaller (zero-inserted parts of at most 10 MiB: Lite0 224 b8's 112x112 one by 4 parts, its 56x56 one by 2):
# the parts' values stay nearer the core (10 MiB: -2% step against 32 MiB's halves) and the 112x112 expand conv's
# bias sum (9.2 MiB a part) runs inside XNNPACK too. A frozen linear's input gradient reads its transposed
# weight as a constant of its own, so XNNPACK's weight cache packs each constant one way (task L2).
DELEGATED = Lowering(bias_as_add=True, pads_in_kernel=True, pads_in_kernel_max_depthwise_taps=25,
                     shifted_strided_input_grad=True, zero_inserted_depthwise_input_grad=True,
                     computed_conv_as_matmul=True, few_channel_conv_one_matmul_max_cin=8,
                     max_pool_in_arithmetic=True, batch_first_bias_sum=True,
                     int8_pointwise_linear=True, zero_inserted_split_bytes=10 * 2**20, batch_parts_carried=True,
                     xnnpack_bias_sum_max_bytes=16 * 2**20, linear_input_grad_own_weight=True,
                     int8_frozen_linear=True)
PORTABLE = Lowering(batch_first_bias_sum=True)


def lowering(delegate: bool) -> Lowering:
    return DELEGATED if delegate else PORTABLE


def weights_as_fp32_constants(module: torch.nn.Module) -> int:
    """Replace the int8+scale buffers of `module.store` by one fp32 buffer each (dequantized
    now; each row block apart where the lowering stores a weight by rows), so the exported
    program holds them as constants. A weight the step reads as int8 (`Lowering.int8_linear_weights`)
    keeps its int8 buffers. Returns how many were converted."""
    store = module.store

    def fp32(keys: tuple[str, ...]) -> tuple[str, ...]:
        w = store.dequantize(getattr(store, keys[0]), getattr(store, keys[1])).contiguous()
        delattr(store, keys[0])
        delattr(store, keys[1])
        store.register_buffer(keys[0], w)
        return (keys[0],)

    n = 0
    for name, keys in list(store.slots.items()):
        if len(keys) == 2 and name not in store.int8_weights:
            store.slots[name] = fp32(keys)
            n += 1
    for name, blocks in store.block_slots.items():
        store.block_slots[name] = {rows: fp32(keys) if len(keys) == 2 else keys for rows, keys in blocks.items()}
        n += 1
    return n


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def _is_bool_to_float(node) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _CASTS:
        return False
    src, out = node.args[0], node.meta.get("val")
    return (isinstance(src, torch.fx.Node) and getattr(src.meta.get("val"), "dtype", None) == torch.bool
            and getattr(out, "dtype", None) == torch.float32)


def masks_as_where(ep) -> int:
    """Rewrite `g * mask.float()` as `where(mask, g, 0)` and drop `x * 1.0`, in place. Exact. On
    ExecuTorch's CPU kernels a bool→float cast is a slow generic copy (the largest cost of the
    masked backward) and its float copy of the mask costs planned memory; `where` has an
    optimized kernel and reads the bool mask directly. Returns the number of rewrites."""
    g, n_done = ep.graph, 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mul.Tensor or len(node.args) != 2:
            continue
        a, b = node.args
        if any(u.op == "output" for u in node.users):
            continue
        out = node.meta.get("val")
        if isinstance(b, (int, float)) and float(b) == 1.0 and isinstance(a, torch.fx.Node):
            va = a.meta.get("val")
            if va is not None and out is not None and va.dtype == out.dtype and va.shape == out.shape:
                node.replace_all_uses_with(a)
                g.erase_node(node)
                n_done += 1
            continue
        if _is_bool_to_float(b) and isinstance(a, torch.fx.Node):
            cast, other = b, a
        elif _is_bool_to_float(a) and isinstance(b, torch.fx.Node):
            cast, other = a, b
        else:
            continue
        if getattr(other.meta.get("val"), "dtype", None) != torch.float32:
            continue
        with g.inserting_before(node):
            w = g.call_function(torch.ops.aten.where.ScalarOther, (cast.args[0], other, 0.0))
        w.meta = dict(node.meta)
        node.replace_all_uses_with(w)
        g.erase_node(node)
        n_done += 1
    g.eliminate_dead_code()
    ep.graph_module.recompile()
    return n_done


_ATEN = torch.ops.aten
_ASSERT = _ATEN._assert_tensor_metadata.default


def _interval(node) -> tuple | None:
    """(v, lo, hi) when `node` is the bool mask lo < v < hi (a bound None where absent), built by
    `gt`/`lt` with a scalar and `&`: every mask an activation rule keeps or builds."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    a = node.args
    if node.target in (_ATEN.gt.Scalar, _ATEN.lt.Scalar) and isinstance(a[0], torch.fx.Node) \
            and isinstance(a[1], (int, float)) and not isinstance(a[1], bool):
        return (a[0], float(a[1]), None) if node.target is _ATEN.gt.Scalar else (a[0], None, float(a[1]))
    if node.target in (_ATEN.__and__.Tensor, _ATEN.bitwise_and.Tensor, _ATEN.logical_and.default):
        p, q = _interval(a[0]), _interval(a[1])
        if p and q and p[0] is q[0] and (p[1] is None) != (q[1] is None) and (p[2] is None) != (q[2] is None):
            return p[0], p[1] if p[1] is not None else q[1], p[2] if p[2] is not None else q[2]
    return None


def _call(g: torch.fx.Graph, like: torch.fx.Node, op, *args, **kwargs) -> torch.fx.Node:
    """g.call_function(op, args, kwargs) with `like`'s meta and the value it computes (on fake tensors)."""
    node = g.call_function(op, args, kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    fake = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    with like.meta["val"].fake_mode:
        node.meta["val"] = op(*fake, **kwargs)
    return node


def _indicator(g: torch.fx.Graph, like: torch.fx.Node, v, lo, hi) -> torch.fx.Node:
    """1.0 where lo < v < hi, else 0.0, from float ops XNNPACK runs (subtract, minimum, ceiling,
    clamp). Exact: a difference of floats has the sign of the exact difference, so
    t = min(v - lo, hi - v) > 0 iff lo < v < hi, and clamp(ceil(t), 0, 1) is 1 iff t > 0. (XNNPACK
    flushes denormals to zero, as it does in the activation v it computes itself.)"""
    parts = []
    if lo is not None:
        parts.append(v if lo == 0.0 else _call(g, like, _ATEN.sub.Tensor, v, lo))
    if hi is not None:
        parts.append(_call(g, like, _ATEN.rsub.Scalar, v, hi))
    t = parts[0] if len(parts) == 1 else _call(g, like, _ATEN.minimum.default, *parts)
    return _call(g, like, _ATEN.clamp.default, _call(g, like, _ATEN.ceil.default, t), 0.0, 1.0)


def _unexpanded(g: torch.fx.Node) -> torch.fx.Node:
    """The tensor `g` broadcasts, where g is only its expanded copy (a mean's gradient): the multiply
    by the mask broadcasts it instead, so the copy is never made (nor alive beside the float mask)."""
    src = g
    if src.target is _ATEN.contiguous.default and len(src.users) == 1:
        src = src.args[0]
    if src.target is _ATEN.expand.default and len(src.users) == 1 and isinstance(src.args[0], torch.fx.Node):
        return src.args[0]
    return g


_QD = decomposed_quant_ops()
# The 0/1 mask as int8 (SMALL_INT8): XNNPACK converts float <-> int8 itself, inside the delegates that make
# and apply the mask, so the plan holds only the int8 mask between them.


def masks_as_int8(ep) -> int:
    """Rewrite each bool mask lo < v < hi applied as `where(m, g, 0)` (the masked backward of ReLU,
    ReLU6, clamp, Hardsigmoid; after `masks_as_where`) as `g · mask`, in place. Exact.

    ExecuTorch's kernels for bool tensors take a generic per-element path: at one thread,
    8x96x64x64, `gt` + `lt` + `&` cost 20 ms and `where(m, g, 0)` 33 ms, against 5 ms for a float
    multiply (bench/et_step_profile.py: 60% of Lite0's `bias+mask` step). The 0/1 indicator is made
    by float ops XNNPACK runs and the multiply joins its delegates. A mask kept for the backward
    is stored as int8 (1 byte, as the bool was), quantized (scale 1) where it is made and
    dequantized where it is applied, both in XNNPACK (there, 8x96x64x64: make 6 ms, apply 6 ms;
    ExecuTorch's own casts would hold a float copy of the mask in the plan); one applied right
    where it is made stays float. Returns the number of masks rewritten."""
    g, n_done = ep.graph, 0
    written = list(g.nodes)
    order = {n: i for i, n in enumerate(written)}
    for node in written:
        iv = _interval(node)
        if iv is None or node.meta.get("val") is None:
            continue
        users = [u for u in node.users if u.target is not _ASSERT]
        applied = _mask_applications(node, users)
        if applied is None:
            continue
        v, lo, hi = iv
        late = len(users) == 1 and not applied[0][1] and \
            all(n.target is _ASSERT for n in written[order[node] + 1 : order[users[0]]])
        if late:  # applied where it is made: the float indicator, next to its multiply
            with g.inserting_before(users[0]):
                mask = _indicator(g, node, v, lo, hi)
        else:  # kept: int8 from where it is made until each use
            with g.inserting_before(node.next):
                mask = _call(g, node, _QD.quantize_per_tensor.default, _indicator(g, node, v, lo, hi), *SMALL_INT8)
        int8_slices = {}  # each batch part's slice of the int8 mask, where the bool mask's slice was written
        for s in {u.args[0] for u, sliced in applied if sliced}:
            with g.inserting_before(s):
                int8_slices[s] = _call(g, s, _ATEN.slice.Tensor, mask, *s.args[1:4])
        for u, sliced in applied:
            with g.inserting_before(u):
                m = mask if late else int8_slices[u.args[0]] if sliced else mask
                m = m if late else _call(g, u, _QD.dequantize_per_tensor.default, m, *SMALL_INT8)
                gm = _call(g, u, _ATEN.mul.Tensor, _unexpanded(u.args[1]), m)
            u.replace_all_uses_with(gm)
            g.erase_node(u)
        for s in [u for u in users if u.target is _ATEN.slice.Tensor]:
            g.erase_node(s)
        for a in [u for u in node.users if u.target is _ASSERT]:
            g.erase_node(a)
        n_done += 1
    g.eliminate_dead_code()
    ep.graph_module.recompile()
    return n_done


def _applies_mask(u: torch.fx.Node, mask: torch.fx.Node) -> bool:
    """Whether `u` is where(mask, g, 0) for a float g."""
    return (u.target is _ATEN.where.ScalarOther and u.args[0] is mask and u.args[2] == 0
            and isinstance(u.args[1], torch.fx.Node)
            and getattr(u.args[1].meta.get("val"), "dtype", None) == torch.float32)


def _mask_applications(mask: torch.fx.Node, users: list) -> list | None:
    """(where(m, g, 0), whether m is a batch part's slice of the bool `mask`) for each use of `mask`, applied whole
    or by such slices (`Lowering.batch_parts_carried`); None where it has other users."""
    out = []
    for u in users:
        if _applies_mask(u, mask):
            out.append((u, False))
        elif u.target is _ATEN.slice.Tensor and len(u.args) >= 4 and u.args[1] == 0 and \
                (len(u.args) < 5 or u.args[4] == 1) and u.users and all(_applies_mask(w, u) for w in u.users):
            out.extend((w, True) for w in u.users)
        else:
            return None
    return out or None


# A node's position in the step as written, kept in node.meta["custom"]: the one meta entry that
# survives decomposition (which rebuilds every node) and ExecuTorch's passes.
_ORDER = "edgetl_order"


def number_nodes(graph: torch.fx.Graph) -> None:
    """Record each node's position in the step's own schedule (forward, keeps, backward)."""
    for i, node in enumerate(graph.nodes):
        node.meta["custom"] = {**node.meta.get("custom", {}), _ORDER: i}


def _written(node) -> int | None:
    return node.meta.get("custom", {}).get(_ORDER)


def _priority(node, done: dict) -> float:
    """Where `node` belongs in the written schedule: its recorded position; for a delegate call,
    the earliest position among the nodes it replaced; else right after its latest input."""
    if _written(node) is not None:
        return _written(node)
    sub = None
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate":
        sub = getattr(node.graph.owning_module, node.args[0].target).original_module.graph
    elif node.op == "call_module":  # a partition fused, not lowered yet
        sub = getattr(node.graph.owning_module, node.target).graph
    if sub is not None:
        orders = [o for o in map(_written, sub.nodes) if o is not None]
        if orders:
            return min(orders)
    return max((done[i] for i in node.all_input_nodes), default=-1.0) + 0.5


def restore_program_order(graph: torch.fx.Graph) -> int:
    """Put the nodes back in the step's written order, as far as the dependencies allow, in place.

    Lowering to XNNPACK re-sorts the whole graph breadth-first (`legalize_graph`, after each
    partition is fused), which runs every op as soon as its inputs exist: the backward's
    comparisons are hoisted into the forward (a ReLU's float output then dies at once, so `bias`
    keeps masks as `bias+mask` does, and a max-pool keeps one bool per tap instead of one uint8
    index), and independent branches are all opened at once. ExecuTorch's memory plan follows
    the graph's order, so it is restored here: a topological sort that always runs the ready node
    written first. Returns how many nodes moved."""
    nodes = list(graph.nodes)
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: sum(1 for i in n.all_input_nodes if i.op != "placeholder") for n in body}
    done: dict = {n: -1.0 for n in nodes if n.op == "placeholder"}
    ready = []
    for n in body:
        if waiting[n] == 0:
            done[n] = _priority(n, done)
            heapq.heappush(ready, (done[n], index[n], n))
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            if u in waiting:
                waiting[u] -= 1
                if waiting[u] == 0:
                    done[u] = _priority(u, done)
                    heapq.heappush(ready, (done[u], index[u], u))
    assert len(order) == len(body), "graph has a cycle"
    anchor = [n for n in nodes if n.op == "placeholder"][-1] if done else None
    moved = sum(1 for a, b in zip(order, body) if a is not b)
    for n in order:
        if anchor is None:
            nodes[0].prepend(n)
        else:
            anchor.append(n)
        anchor = n
    graph.lint()
    return moved


@contextlib.contextmanager
def fused_in_written_order():
    """While active, ExecuTorch's lowering re-sorts the graph after it fuses each delegate partition in
    the step's written order (`restore_program_order`) instead of breadth-first. A partition's nodes are
    fused in the graph's order, which is the order XNNPACK runs them in inside the call and so what its
    workspace holds at once. Breadth-first, a conv written as one matmul per kernel tap ran every tap's
    window and product before the first add, all alive together (mnist_cnn `full` b32: a 27.7 MiB
    workspace; in written order one tap at a time)."""
    from executorch.exir import lowered_backend_module as lbm

    base = lbm.legalize_graph

    def legalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        restore_program_order(gm.graph)
        gm.recompile()
        return gm

    lbm.legalize_graph = legalize
    try:
        yield
    finally:
        lbm.legalize_graph = base


def split_at_outside_uses(graph: torch.fx.Graph, partitions: list) -> list:
    """Cut each delegate partition where a value it makes is used outside it, so each piece runs
    where the step runs it and its outputs are made when needed.

    XNNPACK merges all its ops into as few delegates as it can: for a CNN the whole forward is
    one call, whose outputs are every activation a kept mask is made from (comparisons run
    outside XNNPACK), so all of them are alive at once and masks save nothing. Cut at the graph
    positions of the outside users, a convex partition gives convex pieces (an interval of a
    topological order), each ending where its outputs are used. Frozen weights (placeholders)
    go with their first user; the lowering shares a constant between pieces that use it."""
    from torch.fx.passes.infra.partitioner import Partition

    index = {n: i for i, n in enumerate(graph.nodes)}
    out, next_id = [], 0
    for part in partitions:
        members = set(part.nodes)
        compute = [n for n in members if n.op != "placeholder"]
        cuts = sorted({index[u] for n in compute for u in n.users if u not in members}
                      # and right after each part a batch cat joins (`batch_cat`): each part its own call
                      | {index[n] + 1 for n in compute if any(batch_cat(u) for u in n.users)}
                      # and where a value it reads is made outside it: else independent pieces written
                      # far apart (each layer's mask) merge into one call that runs after all their inputs
                      | {index[p] for n in compute for p in n.all_input_nodes
                         if p not in members and p.op != "placeholder"})
        piece = {n: bisect.bisect_left(cuts, index[n]) for n in compute}
        for n in members - set(compute):
            users = [u for u in n.users if u in piece]
            piece[n] = min((piece[u] for u in users), default=0)
        groups: dict[int, list] = {}
        for n, k in piece.items():
            groups.setdefault(k, []).append(n)
        for k in sorted(groups):
            if all(n.op == "placeholder" for n in groups[k]):
                continue
            out.append(Partition(id=next_id, nodes=groups[k]))
            next_id += 1
    return out


def batch_cat(node: torch.fx.Node) -> bool:
    """Whether `node` joins 4-D values along the batch: the parts of an input gradient computed by batch parts
    (`Lowering.zero_inserted_split_bytes`). Left to ExecuTorch's cat, so each part ends its own XNNPACK call
    and XNNPACK's workspace (sized by its largest call) holds one part's inner values, not all of them."""
    if node.op != "call_function" or "cat" not in str(node.target):
        return False
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 4 and dim == 0 and len(parts) > 1


def _constant_prop_skips() -> set:
    """ExecuTorch's default constant-propagation skips plus the aten-level weight dequantize."""
    from executorch.exir.passes.constant_prop_pass import _DEFAULT_SKIP_TARGETS

    return set(_DEFAULT_SKIP_TARGETS) | {_QD.dequantize_per_channel.default}


def _weight_only_int8_linear_config():
    """ExecuTorch 1.5.1's XNNPACK linear config, also taking fp32 activations with a per-channel int8 weight
    (dequantize -> linear, no activation quantize): XNNPACK runs it as its f32_qc8w fully connected, packed
    1 byte per weight. The stock config reads a dequantized weight as static quantization and then asks
    for a quantized activation and output; as dynamic quantization the weight's deps are the same, and
    only the activation's are changed here (none)."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.backends.xnnpack.utils.utils import get_input_node

    class WeightOnlyInt8LinearConfig(LinearConfig):
        def _weight_only(self, node) -> bool:
            return (is_dequant(get_input_node(node, self.weight_idx))
                    and not is_dequant(get_input_node(node, self.act_idx)))

        def _detect_precision(self, node):
            if self._weight_only(node):
                return ConfigPrecisionType.DYNAMIC_QUANT
            return super()._detect_precision(node)

        def _get_act_deps(self, node, ep, precision):
            if self._weight_only(node):
                return True, []
            return super()._get_act_deps(node, ep, precision)

    return LinearConfig, WeightOnlyInt8LinearConfig


# the most bytes a value `pulled_into_producers` moves may have: reductions and what follows them, not
# layers (pulling a backward's large values into the forward's partition grew Lite0's workspace to 110 MiB)
PULL_MAX_BYTES = 2**16


def _small(n: torch.fx.Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.numel() * v.element_size() <= PULL_MAX_BYTES


def pulled_into_producers(graph: torch.fx.Graph, partitions: list) -> int:
    """Move each small node (PULL_MAX_BYTES) whose computed inputs all come from one other partition into
    that partition, where that leaves no dependency cycle; in place, in graph order (a chain follows its
    first node). Returns how many nodes moved.

    torch's partitioner merges a node into its users' partition first: a reduction the backward reads
    nothing of (a conv bias's gradient as XNNPACK means) joined the partition of the nodes after the
    backward's remaining portable ops, one partition interleaved with the backward's, and
    `split_at_outside_uses` then cut both at every layer (EfficientNet-Lite0: 124 -> 166 calls)."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    owner = {n: p for p in partitions for n in p.nodes}
    moved = 0
    for n in graph.nodes:
        here = owner.get(n)
        sources = {owner.get(i) for i in n.all_input_nodes if i.op != "placeholder"}
        if here is None or len(sources) != 1 or not _small(n):
            continue
        (there,) = sources
        if there is None or there is here:
            continue
        if validate_partition(list(there.nodes) + [n]) and validate_partition([m for m in here.nodes if m is not n]):
            here.remove_node(n)
            there.add_node(n)
            owner[n] = there
            moved += 1
    return moved


def _partitioner():
    """XNNPACK's partitioner (its linear also with int8 weights and fp32 activations), its nodes pulled into
    their producers' partitions (`pulled_into_producers`), its partitions cut by `split_at_outside_uses`."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class SplitXnnpackPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            graph = ep.graph_module.graph
            partitions = super().generate_partitions(ep)
            pulled_into_producers(graph, partitions)
            return split_at_outside_uses(graph, [p for p in partitions if p.nodes])

    stock, weight_only = _weight_only_int8_linear_config()
    stock_cat, no_batch_cat = _no_batch_cat_config()
    swap = {stock: weight_only, stock_cat: no_batch_cat}
    return SplitXnnpackPartitioner(configs=[swap.get(c, c) for c in ALL_PARTITIONER_CONFIGS])


def _no_batch_cat_config():
    """XNNPACK's cat config, leaving a cat along the batch (`batch_cat`) to ExecuTorch's kernels."""
    from executorch.backends.xnnpack.partition.config.generic_node_configs import CatConfig

    class NoBatchCatConfig(CatConfig):
        def check_constraints(self, node, ep) -> bool:
            return not batch_cat(node) and super().check_constraints(node, ep)

    return CatConfig, NoBatchCatConfig


def _lower(module: torch.nn.Module, args: tuple, delegate: bool):
    """torch.export → (mask rewrite) → edge (→ XNNPACK) → ExecuTorch program manager."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    with torch.no_grad(), warnings.catch_warnings(), contextlib.ExitStack() as shortcuts:
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, strict=False)
        masks_as_where(ep)
        if delegate:
            masks_as_int8(ep)
        number_nodes(ep.graph)
        # ExecuTorch's own exporter warns about experimental APIs; the program is checked by tests.
        cfg = EdgeCompileConfig(_check_ir_validity=False)
        if delegate:
            # fold flipped/transposed frozen kernels into constants; an int8 weight's dequantize stays (XNNPACK
            # reads dequantize -> linear as an int8 weight, `Lowering.int8_pointwise_linear`)
            ep = constant_prop_pass(ep, custom_skip_targets=_constant_prop_skips())
            shortcuts.enter_context(lazy_recompiles())  # (et_fast.py) the same program, written sooner
            shortcuts.enter_context(shared_provenance())
            shortcuts.enter_context(materialize_cia_ops_once())
            with skip_identity_decompositions(), skip_identity_retraces(), fused_in_written_order():
                edge = to_edge_transform_and_lower(ep, partitioner=[_partitioner()], compile_config=cfg)
        else:
            edge = to_edge(ep, compile_config=cfg)
        restore_program_order(edge.exported_program().graph)
        return edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True,
                                                          memory_planning_pass=memory_planning_pass()))


def _delegated_ops(et) -> dict:
    """Counts of ops left on ExecuTorch's own kernels and of delegate calls, per program."""
    plan = et.executorch_program.execution_plan[0]
    counts: dict[str, int] = {}
    for chain in plan.chains:
        for ins in chain.instructions:
            args = ins.instr_args
            if hasattr(args, "op_index"):
                op = plan.operators[args.op_index].name
                counts[op] = counts.get(op, 0) + 1
            elif hasattr(args, "delegate_index"):
                counts["<delegate>"] = counts.get("<delegate>", 0) + 1
    return {"delegate_calls": counts.pop("<delegate>", 0), "portable_ops": sum(counts.values()),
            "portable_op_kinds": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def _write(et, path: Path, channels: set[int]) -> dict:
    """Write the program; where the delegate's constant blobs (the frozen weights, dequantized
    from int8) are exactly int8 per channel, store them so (`edgetl.runtime.backends.executorch_q8`).
    Returns the program's size and the file's."""
    buf = et.buffer
    if channels:
        named = getattr(et, "_named_data", None)
        blobs = [b.to_bytes() if hasattr(b, "to_bytes") else bytes(b) for b in (named.buffers if named else [])]
        packed = pack(buf, blobs, channels)
        if len(packed) < len(buf):
            path.write_bytes(packed)
            return {"program": len(buf), "file": len(packed)}
    path.write_bytes(buf)
    return {"program": len(buf), "file": len(buf)}


def planned_bytes(et) -> int:
    return int(sum(et.executorch_program.execution_plan[0].non_const_buffer_sizes))


def constant_bytes(et) -> int:
    """The program's constants for its delegates (the frozen weights as fp32): what XNNPACK packs."""
    named = getattr(et, "_named_data", None)
    return int(sum(len(b.to_bytes() if hasattr(b, "to_bytes") else bytes(b)) for b in (named.buffers if named else [])))


def export_executorch(prepared, optimizer, batch_size: int, out: Path, delegate: bool = True,
                      weight_block_bytes: int | None = None, eval_batch: int | None = None) -> dict:
    """The step program at `batch_size` samples (the micro-batch where `optimizer` accumulates: its
    accumulators are state inputs and outputs like the optimizer's own) and the eval and inference
    programs at `eval_batch` (default: batch_size)."""
    low = dataclasses.replace(lowering(delegate), weight_block_bytes=weight_block_bytes)
    params = prepared.initial_params()
    state = optimizer.init_state(params)
    snames = optimizer.state_names(prepared.trainable)
    x = torch.zeros(batch_size, *prepared.graph.input_shape)
    y = torch.zeros(batch_size, dtype=torch.int64)
    lr = torch.tensor(optimizer.lr, dtype=torch.float32)
    flat = [params[t] for t in prepared.trainable] + [state[k] for k in snames]
    n = len(prepared.trainable)

    step = LeanStep(prepared, optimizer, low).eval()
    ev = LeanEval(prepared, low).eval()
    if delegate:
        weights_as_fp32_constants(step)
        weights_as_fp32_constants(ev)
    frozen_int8 = prepared.graph.frozen_dtype == "int8"
    channels = {int(d) for t in prepared.stored for d in prepared.frozen(t).shape} if frozen_int8 else set()
    et_step = _lower(step, (x, y, lr, *flat), delegate)
    train_file, eval_file = EXECUTORCH.program("train_step").file, EXECUTORCH.program("eval").file
    sizes = {train_file: _write(et_step, out / train_file, channels)}  # inputs in the spec's order (bound by position)
    xe = x if eval_batch is None or eval_batch == batch_size else torch.zeros(eval_batch, *prepared.graph.input_shape)
    et_eval = _lower(ev, (xe, *flat[:n]), delegate)
    sizes[eval_file] = _write(et_eval, out / eval_file, channels)

    info = {
        "delegate": "xnnpack" if delegate else None,
        "frozen_weights_in_program": ("fp32 constants for XNNPACK, stored int8 + per-channel scales in the file "
                                      "and restored byte-exactly at load; those of linear layers and of the 1x1 convs "
                                      "that run as XNNPACK linears int8 (Lowering.int8_frozen_linear, "
                                      "int8_pointwise_linear)" if frozen_int8 else "fp32")
        if delegate else ("int8 (dequantized in the program)" if frozen_int8 else "fp32"),
        "program_bytes": sizes,
        "trainable_bias_as_separate_add": bool(delegate),
        "planned_bytes": planned_bytes(et_step),
        "planned_bytes_note": "ExecuTorch's memory plan for one step (activations, kept tensors, inputs, "
                              "outputs); XNNPACK's packed weights and scratch are allocated on top",
        "eval_planned_bytes": planned_bytes(et_eval),
        # what the runtime allocates outside the plan (edgetl.runtime.profile's whole-process model)
        "xnnpack_workspace_bytes": max(delegate_inner_bytes(et_step) + delegate_inner_bytes(et_eval) + [0]),
        "xnnpack_packed_weights_bytes": constant_bytes(et_step),
        "static_batch": batch_size if eval_batch is None else eval_batch,
        "train_step_ops": _delegated_ops(et_step),
        "eval_ops": _delegated_ops(et_eval),
    }
    res = {"extra": {"executorch": info}}
    merged = merged_model(prepared)
    if merged is not None:  # LoRA: an inference program reading the merged weights as inputs (see lora.py)
        mev = LeanEval(merged, low).eval()
        if delegate:
            weights_as_fp32_constants(mev)
        mp = merged.initial_params()
        _write(_lower(mev, (xe, *(mp[t] for t in merged.trainable)), delegate), out / INFERENCE_FILE, channels)
        lora = write_lora_file(prepared, out, "inference")
        lora["inputs"] = list(merged.trainable)  # the program's inputs after x, in order (bound by position)
        res |= {"programs": {"inference": INFERENCE_FILE}, "files": [LORA_FILE]}
        res["extra"]["lora"] = lora
    return res


# ---- peer baseline: ExecuTorch's own training flow (not wired into `export`) ---------------------

class _JointNet(torch.nn.Module):
    """The prepared model as an ordinary autograd module: trainable tensors are parameters,
    frozen ones fp32 buffers (dequantized from int8 at export); forward is (loss, logits)."""

    def __init__(self, prepared):
        super().__init__()
        self.prepared = prepared
        self.fqn = {t: f"p{i}" for i, t in enumerate(prepared.trainable)}
        params = prepared.initial_params()
        for t, key in self.fqn.items():
            self.register_parameter(key, torch.nn.Parameter(params[t].clone()))
        self.frozen = {}
        for i, t in enumerate(prepared.stored):
            self.register_buffer(f"f{i}", prepared.frozen(t).clone())
            self.frozen[t] = f"f{i}"

    def forward(self, x, y):
        params = {t: getattr(self, key) for t, key in self.fqn.items()}
        weights = weights_from(params, lambda t: getattr(self, self.frozen[t]))
        logits = interpret(self.prepared.graph, x, computing(weights, reference=True))
        return F.cross_entropy(logits, y), logits.detach()


def export_executorch_joint(prepared, batch_size: int, out: Path, name: str = "train_joint.pte") -> dict:
    """ExecuTorch's joint-graph training flow (torch.export → `_export_forward_backward` → to_edge →
    to_executorch), the peer baseline for the lean step. The program's outputs are [loss, logits,
    gradients..., parameters...]; it is run by `executorch.extension.training.TrainingModule`
    (which needs torch) with an optimizer outside the program. Autograd decides what the backward
    keeps, so recipe modifiers such as `mask` have no effect here; no XNNPACK delegation (the
    delegate would bake trainable conv biases into its packed weights).

    Known issue (executorch 1.5.1): the portable `max_pool2d_with_indices_backward` does not zero
    its output (pytorch/executorch#21686, fixed upstream by #21878), so any conv → max-pool model
    (e.g. mnist_cnn) gets corrupted conv gradients in this flow; the lean step has no such op."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    net = _JointNet(prepared)
    args = (torch.zeros(batch_size, *prepared.graph.input_shape), torch.zeros(batch_size, dtype=torch.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = _export_forward_backward(torch.export.export(net, args, strict=False))
        et = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    (Path(out) / name).write_bytes(et.buffer)
    return {"programs": {"joint_step": name},
            "extra": {"executorch_joint": {"param_fqns": {t: k for t, k in net.fqn.items()},
                                           "planned_bytes": planned_bytes(et)}}}
