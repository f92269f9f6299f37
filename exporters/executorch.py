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
* A trainable bias of a frozen-weight conv/linear is emitted as a separate add after the
  bias-free op, so it is a plain program input, never part of a delegated op (XNNPACK bakes
  *constant* biases into its packed weights; in ExecuTorch's joint-graph flow that silently
  freezes them). Measured: with the bias inside the conv XNNPACK also trains correctly here
  (the bias is an input, not a constant), but the separate add is faster.
* `g * mask.float()` in the masked backward is rewritten to `where(mask, g, 0)` (exact): the
  bool→float cast is a slow generic kernel in ExecuTorch and its float copy costs planned memory.
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
import dataclasses
import heapq
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetl.interpret import computing, interpret, weights_from
from edgetl.lowering import Lowering
from edgetl.runtime.backends.executorch_q8 import pack
from edgetl.runtime.targets import EXECUTORCH
from edgetl.step import LeanEval, LeanStep

from .et_retrace import skip_identity_retraces
from .lora import LORA_FILE, merged_model, write_lora_file

INFERENCE_FILE = "inference.pte"


# What ExecuTorch needs from the step, with XNNPACK and without: it runs the step as written (no
# schedule pins); with XNNPACK, a trainable bias of a frozen-weight linear is a separate add, so the
# delegated op has no bias to bake into its packed weights (the conv rule always adds its bias).
DELEGATED, PORTABLE = Lowering(bias_as_add=True), Lowering()


def lowering(delegate: bool) -> Lowering:
    return DELEGATED if delegate else PORTABLE


def weights_as_fp32_constants(module: torch.nn.Module) -> int:
    """Replace the int8+scale buffers of `module.store` by one fp32 buffer each (dequantized
    now; each row block apart where the lowering stores a weight by rows), so the exported
    program holds them as constants. Returns how many were converted."""
    store = module.store

    def fp32(keys: tuple[str, ...]) -> tuple[str, ...]:
        w = store.dequantize(getattr(store, keys[0]), getattr(store, keys[1])).contiguous()
        delattr(store, keys[0])
        delattr(store, keys[1])
        store.register_buffer(keys[0], w)
        return (keys[0],)

    n = 0
    for name, keys in list(store.slots.items()):
        if len(keys) == 2:
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
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate":
        sub = getattr(node.graph.owning_module, node.args[0].target).original_module.graph
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
        cuts = sorted({index[u] for n in compute for u in n.users if u not in members})
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


def _partitioner():
    """XNNPACK's partitioner, its partitions cut by `split_at_outside_uses`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class SplitXnnpackPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            return split_at_outside_uses(ep.graph_module.graph, super().generate_partitions(ep))

    return SplitXnnpackPartitioner()


def _lower(module: torch.nn.Module, args: tuple, delegate: bool):
    """torch.export → (mask rewrite) → edge (→ XNNPACK) → ExecuTorch program manager."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, strict=False)
        masks_as_where(ep)
        number_nodes(ep.graph)
        # ExecuTorch's own exporter warns about experimental APIs; the program is checked by tests.
        cfg = EdgeCompileConfig(_check_ir_validity=False)
        if delegate:
            ep = constant_prop_pass(ep)  # fold flipped/transposed frozen kernels into constants
            with skip_identity_retraces():
                edge = to_edge_transform_and_lower(ep, partitioner=[_partitioner()], compile_config=cfg)
        else:
            edge = to_edge(ep, compile_config=cfg)
        restore_program_order(edge.exported_program().graph)
        return edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))


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


def export_executorch(prepared, optimizer, batch_size: int, out: Path, delegate: bool = True,
                      weight_block_bytes: int | None = None) -> dict:
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
    et_eval = _lower(ev, (x, *flat[:n]), delegate)
    sizes[eval_file] = _write(et_eval, out / eval_file, channels)

    info = {
        "delegate": "xnnpack" if delegate else None,
        "frozen_weights_in_program": ("fp32 constants for XNNPACK, stored int8 + per-channel scales in the file "
                                      "and restored byte-exactly at load" if frozen_int8 else "fp32")
        if delegate else ("int8 (dequantized in the program)" if frozen_int8 else "fp32"),
        "program_bytes": sizes,
        "trainable_bias_as_separate_add": bool(delegate),
        "planned_bytes": planned_bytes(et_step),
        "planned_bytes_note": "ExecuTorch's memory plan for one step (activations, kept tensors, inputs, "
                              "outputs); XNNPACK's packed weights and scratch are allocated on top",
        "eval_planned_bytes": planned_bytes(et_eval),
        "static_batch": batch_size,
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
        _write(_lower(mev, (x, *(mp[t] for t in merged.trainable)), delegate), out / INFERENCE_FILE, channels)
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
