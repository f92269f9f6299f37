"""Three export-time costs of ExecuTorch's lowering that change nothing in the program written.

* `lazy_recompiles`: every pass ends by regenerating its graph's Python code
  (`GraphModule.recompile`: code generation and `compile`), and every graph module built
  recompiles in its constructor; the lowering never runs that code (passes interpret the graph
  node by node), so it was a fifth of the export. While active, graph modules are torch's
  `_LazyGraphModule`, which regenerates its code only when it is run or read.
* `shared_provenance`: each node a pass makes records where it came from
  (`node.meta["from_node"]`, torch.fx.traceback.NodeSource) and deep-copies the whole provenance
  chain of its source, which grows by a link per pass: a sixth of the export. The chain's
  NodeSource objects are never changed once made, so the new node shares them instead.
* `materialize_cia_ops_once`: every decomposition walks all of the dispatcher's
  CompositeImplicitAutograd ops again to put them in `torch.ops`; once is enough while the
  dispatcher's list is unchanged.

All are checked by tests/test_executorch_export_speed.py: the same programs, byte for byte.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch


@contextlib.contextmanager
def lazy_recompiles():
    """While active, graph modules built (`torch.fx.GraphModule(...)`, a deep copy, or torch's
    own `_make_graph_module`) are lazy: `recompile()` only marks their code stale. They stay lazy
    afterwards (their code is made when first run or read). Not thread-safe."""
    from torch.fx import GraphModule
    from torch.fx import _lazy_graph_module as lazy
    from torch.fx.graph import _PyTreeCodeGen

    # XNNPACK's upsample pass builds its patterns once with a strict torch.export, which fails on
    # lazy graph modules (it reads the output spec a lazy recompile leaves unset): build them now.
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d
    from executorch.exir.backend import backend_api

    bilinear_2d.get_graphs_dict()

    base_new, base_recompile = GraphModule.__dict__["__new__"], lazy._LazyGraphModule.__dict__["recompile"]

    def new(cls, *args, **kwargs):
        plain = cls if cls.__qualname__.split(".")[-1] != "GraphModuleImpl" else cls.__mro__[1]
        return base_new(lazy._LazyGraphModule if plain is GraphModule else cls, *args, **kwargs)

    def recompile(self) -> None:
        # what GraphModule.recompile sets besides the code (_LazyGraphModule's own leaves it unset)
        if isinstance(self._graph._codegen, _PyTreeCodeGen):
            self._in_spec = self._graph._codegen.pytree_info.in_spec
            self._out_spec = self._graph._codegen.pytree_info.out_spec
        type(self).forward = lazy._LazyGraphModule._lazy_forward

    # Partitioning formats the whole program for a debug message (an f-string, so even with
    # logging off) once per delegate: that would generate its code every time. Unless debug
    # logging is on, a graph module reads there as the plain module it is.
    base_create, base_str = backend_api._create_partitions_in_graph_module, lazy._LazyGraphModule.__str__

    def create_partitions(*args, **kwargs):
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return base_create(*args, **kwargs)
        lazy._LazyGraphModule.__str__ = torch.nn.Module.__str__
        try:
            return base_create(*args, **kwargs)
        finally:
            lazy._LazyGraphModule.__str__ = base_str

    GraphModule.__new__ = staticmethod(new)
    lazy._LazyGraphModule.recompile = recompile
    backend_api._create_partitions_in_graph_module = create_partitions
    try:
        with lazy._use_lazy_graph_module(True):
            yield
    finally:
        backend_api._create_partitions_in_graph_module = base_create
        lazy._LazyGraphModule.recompile = base_recompile
        GraphModule.__new__ = base_new


@contextlib.contextmanager
def shared_provenance():
    """While active, a node's provenance (`meta["from_node"]`) shares its source's chain instead
    of deep-copying it. Not thread-safe."""
    from torch.fx.traceback import NodeSource

    base_init = NodeSource.__init__

    def init(self, node, pass_name: str = "", action=None) -> None:
        base_init(self, None, pass_name, action)
        if node:
            self.node_info = NodeSource.NodeInfo(name=node.name, target=str(node.target), graph_id=id(node.graph))
            chain = node.meta.get("from_node", [])
            self.from_node = list(chain) if isinstance(chain, list) else copy.deepcopy(chain)

    NodeSource.__init__ = init
    try:
        yield
    finally:
        NodeSource.__init__ = base_init


@contextlib.contextmanager
def materialize_cia_ops_once():
    """While active, torch's `_materialize_cpp_cia_ops` (a `getattr` on every CompositeImplicitAutograd
    op the dispatcher knows, so that each is in `torch.ops`) is skipped when the dispatcher's list is
    the one it already walked: the getattrs would only find the same ops again. Each decomposition
    and each decomposition table read calls it (hundreds of thousands of getattrs per export).
    Not thread-safe."""
    import torch._export.utils as export_utils

    base = export_utils._materialize_cpp_cia_ops
    walked = [None]

    def materialize() -> None:
        ops = frozenset(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"))
        if ops != walked[0]:
            base()
            walked[0] = ops

    export_utils._materialize_cpp_cia_ops = materialize
    try:
        yield
    finally:
        export_utils._materialize_cpp_cia_ops = base
