"""ExecuTorch's memory plan with a second algorithm beside its own: the smaller plan is kept.

ExecuTorch's `greedy` packs tensors into shared objects (buckets) sized by the largest tensor each
first holds; a smaller tensor whose lifetime overlaps a bucket's goes above everything it overlaps
there, so the arena can exceed the most bytes alive at once by a lot. `best_fit` places each tensor,
largest first, at the lowest offset of the arena that is free over its whole lifetime (the classic
offset-based greedy by size). ExecuTorch's algorithm suite runs both and keeps the smaller arena,
so no plan gets larger than ExecuTorch's own.
"""
from __future__ import annotations

from collections import defaultdict


# Orders in which `best_fit` places tensors; each gives a valid plan and the smallest is kept.
_ORDERS = {
    "size": lambda s: (-s.allocated_memory, s.lifetime[0]),
    "size, longest first": lambda s: (-s.allocated_memory, s.lifetime[0] - s.lifetime[1]),
    "size x lifetime": lambda s: (-s.allocated_memory * (s.lifetime[1] - s.lifetime[0] + 1), s.lifetime[0]),
    "longest first": lambda s: (s.lifetime[0] - s.lifetime[1], -s.allocated_memory),
    "size, latest end first": lambda s: (-s.allocated_memory, -s.lifetime[1]),
    "first made": lambda s: (s.lifetime[0], -s.allocated_memory),
    "size, shortest first": lambda s: (-s.allocated_memory, s.lifetime[1] - s.lifetime[0]),
}


def _place(specs: list, alignment: int, base: list) -> dict:
    """{spec: (mem_id, offset)}: each spec in turn at the lowest aligned offset free over its lifetime."""
    aligned = lambda n: (n + alignment - 1) // alignment * alignment  # noqa: E731
    placed: dict[int, list] = defaultdict(list)  # mem_id -> [(offset, end, first, last)]
    out = {}
    for spec in specs:
        mem_id = 1 if spec.mem_id is None else spec.mem_id
        first, last = spec.lifetime
        offset = aligned(base[mem_id] if len(base) > mem_id else 0)
        for o, e, f, l in sorted(p for p in placed[mem_id] if not (last < p[2] or first > p[3])):
            if o - offset >= spec.allocated_memory:
                break
            offset = max(offset, aligned(e))
        placed[mem_id].append((offset, offset + spec.allocated_memory, first, last))
        out[spec] = (mem_id, offset)
    return out


def best_fit(alignment: int, specs, graph_module, graph_signature, extra_padding: int = 0):
    """A memory planning algorithm for ExecuTorch's `MemoryPlanningAlgorithmSuite`: each tensor at the
    lowest aligned offset where no tensor alive at the same time lies, placed in several orders
    (largest first, ...; `_ORDERS`), the smallest arena kept. Defers to ExecuTorch's greedy for
    tensors that live inside another's storage."""
    from executorch.exir.memory_planning import MemoryAlgoResult, SpecAllocResult, greedy

    if any(s.storage_base is not None for s in specs):
        return greedy(alignment, specs, graph_module, graph_signature, extra_padding)
    for spec in specs:
        spec.realign(alignment)
    base = getattr(graph_module, "input_mem_buffer_sizes", None) or []
    best, best_size = None, None
    for key in _ORDERS.values():
        plan = _place(sorted(specs, key=key), alignment, base)
        size = max((off + s.allocated_memory for s, (_, off) in plan.items()), default=0)
        if best is None or size < best_size:
            best, best_size = plan, size
    result = MemoryAlgoResult({s: SpecAllocResult(m, 0, off) for s, (m, off) in best.items()}, [])
    sizes = [0] * (max((m for m, _ in best.values()), default=1) + 1)
    for s, (m, off) in best.items():
        sizes[m] = max(sizes[m], off + s.allocated_memory)
    result.bufsizes = [n + extra_padding if n else n for n in sizes]
    return result


def memory_planning_pass():
    """ExecuTorch's memory planning pass, choosing the smaller of its greedy plan and `best_fit`'s."""
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
    from executorch.exir.passes import MemoryPlanningPass

    return MemoryPlanningPass(memory_planning_algo=MemoryPlanningAlgorithmSuite(algo_list=[greedy, best_fit]))
