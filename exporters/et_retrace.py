"""Skip ExecuTorch's identity re-traces while XNNPACK preprocesses a delegate (export time only).

XNNPACK's preprocess runs 17 passes over every delegate partition, and nearly every pass ends
with `super().call(graph_module)`: a re-trace of the whole partition under fake tensors that
rebuilds each node (a few ms per node). When the pass changed nothing, that re-trace is an
identity: it rebuilds the same ops with the same arguments and recomputes the same shapes.
With the step cut into many delegates (`split_at_outside_uses`) these re-traces were most of
the export time. Here a re-trace is skipped when the graph is structurally unchanged since the
last one (same nodes, targets, arguments, meta keys and meta values by identity) and the pass
does nothing per op (no override of the tracer's per-node hooks), so the program written is the
same, byte for byte (checked by tests/test_executorch_export_speed.py).
"""
from __future__ import annotations

import contextlib

import torch

_MARK = "edgetl_retraced"
# the per-node hooks of ExportPass: a pass overriding any of them does its work in the re-trace
_HOOKS = ("placeholder", "output", "on_attr", "call_operator", "call_sym", "call_cond", "call_while",
          "call_map", "call_scan", "call_getitem", "call_delegate", "call_submodule")


def _arg(a):
    return torch.fx.node.map_arg(a, lambda n: ("node", n.name))


def fingerprint(gm: torch.fx.GraphModule) -> list:
    """What an identity re-trace would rebuild: every node's name, op, target, arguments, and its
    meta entries (by identity: a pass that replaces one gets a re-trace)."""
    return [(n.name, n.op, n.target, _arg(n.args), _arg(n.kwargs),
             tuple(sorted((k, id(v)) for k, v in n.meta.items() if k != "from_node")))
            for n in gm.graph.nodes]


def _has_traced_arg(n) -> bool:
    """Whether an argument of `n` is a traced value (a fake tensor in the re-trace; a get_attr
    is a real constant)."""
    found = []
    torch.fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) if a.op != "get_attr" else None)
    return bool(found)


def _does_per_op_work(p, gm: torch.fx.GraphModule) -> bool:
    """Whether re-tracing `gm` with pass `p` could change it: `p` overrides a per-node hook,
    except the two per-op passes of XNNPACK's list when they have nothing to do here (constant
    folding without an op whose arguments are all constants; dim-order reverts without a
    dim-order op)."""
    from executorch.exir.pass_base import ExportPass
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsRevertPass, MemoryFormatOpsMap

    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    if type(p) is ConstPropPass:
        return not all(_has_traced_arg(n) for n in calls)
    if type(p) is DimOrderOpsRevertPass:
        return any(n.target in MemoryFormatOpsMap for n in calls)
    return any(getattr(type(p), h, None) is not getattr(ExportPass, h, None) for h in _HOOKS)


@contextlib.contextmanager
def skip_identity_retraces(counts: dict | None = None):
    """While active, XNNPACK's passes re-trace a partition only when it changed. `counts` (if
    given) gets how many re-traces ran and how many were skipped. Not thread-safe."""
    from executorch.backends.xnnpack import _passes as xp
    from executorch.exir.pass_base import ExportPass, PassResult

    own_call = "call" in ExportPass.__dict__
    base_call, base_transform = ExportPass.call, xp.XNNPACKPassManager.transform
    active = [False]
    tally = counts if counts is not None else {}
    tally.setdefault("retraced", 0)
    tally.setdefault("skipped", 0)

    def call(self, graph_module):
        if active[0] and not _does_per_op_work(self, graph_module):
            fp = fingerprint(graph_module)
            if graph_module.meta.get(_MARK) == fp:
                tally["skipped"] += 1
                return PassResult(graph_module, False)
        result = base_call(self, graph_module)
        if active[0]:
            tally["retraced"] += 1
            result.graph_module.meta[_MARK] = fingerprint(result.graph_module)
        return result

    def transform(self):
        gm = self.exported_program.graph_module  # traced by to_edge: its shapes are current
        gm.meta[_MARK] = fingerprint(gm)
        active[0] = True
        try:
            return base_transform(self)
        finally:
            active[0] = False

    ExportPass.call, xp.XNNPACKPassManager.transform = call, transform
    try:
        yield tally
    finally:
        xp.XNNPACKPassManager.transform = base_transform
        if own_call:
            ExportPass.call = base_call
        else:
            del ExportPass.call


_DECOMPOSED = "edgetl_decomposed"


def _functional(gm: torch.fx.GraphModule) -> bool:
    """Whether `gm` calls only ATen operators that mutate nothing (no in-place or out= op, no
    higher-order op such as a grad-mode region): functionalizing it, `run_decompositions({})`,
    rebuilds the same graph."""
    for n in gm.graph.nodes:
        if n.op == "call_module" or (n.op == "call_function" and not (
                isinstance(n.target, torch._ops.OpOverload) and not n.target._schema.is_mutable)):
            return False
    return True


@contextlib.contextmanager
def skip_identity_decompositions(counts: dict | None = None):
    """While active, `ExportedProgram.run_decompositions(table)` returns the program itself when
    it uses no op of `table` and either has been decomposed once already or is functional and
    `table` is empty: such a call only re-traces the whole graph into the same ops.
    `to_edge_transform_and_lower` decomposes each program three times (functionalize; the table
    without the ops a partitioner keeps; the default table after the kept ops it can take are set
    aside): the step is functional already, and the last finds nothing to do unless a kept op was
    refused (e.g. a linear whose weight is trainable). `counts`
    (if given) gets how many decompositions ran and how many were skipped. Not thread-safe."""
    from executorch.exir.graph_module import contains_any_call_fn_target_op
    from torch.export import ExportedProgram

    base = ExportedProgram.run_decompositions
    tally = counts if counts is not None else {}
    tally.setdefault("decomposed", 0)
    tally.setdefault("decompositions_skipped", 0)

    def run_decompositions(self, decomp_table=None, decompose_custom_triton_ops=False):
        done = self.graph_module.meta.get(_DECOMPOSED) or (decomp_table == {} and _functional(self.graph_module))
        if (decomp_table is not None and not decompose_custom_triton_ops and done
                and not contains_any_call_fn_target_op(self.graph_module, decomp_table)):
            tally["decompositions_skipped"] += 1
            return self
        ep = base(self, decomp_table, decompose_custom_triton_ops)
        ep.graph_module.meta[_DECOMPOSED] = True
        tally["decomposed"] += 1
        return ep

    ExportedProgram.run_decompositions = run_decompositions
    try:
        yield tally
    finally:
        ExportedProgram.run_decompositions = base
