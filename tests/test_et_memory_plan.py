"""The best-fit memory planner offered to ExecuTorch beside its greedy one: a plan is valid (no two
tensors alive at the same time share a byte) and never needs less than the most bytes alive at once."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("executorch")

from edgetl.exporters.et_memory_plan import best_fit  # noqa: E402


class _Spec:
    """What the planner reads of ExecuTorch's TensorSpec (hashed by identity, as it is)."""

    def __init__(self, size: int, first: int, last: int):
        self.allocated_memory, self.lifetime, self.mem_id, self.storage_base = size, [first, last], None, None

    def realign(self, alignment: int) -> None:
        self.allocated_memory = (self.allocated_memory + alignment - 1) // alignment * alignment


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_plans_are_valid_and_tight(seed):
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(200):
        a = int(rng.integers(0, 300))
        specs.append(_Spec(int(rng.integers(1, 5000)), a, a + int(rng.integers(0, 40))))
    result = best_fit(16, set(specs), SimpleNamespace(), None)
    placed = [(s, result.spec_dict[s].mem_offset) for s in specs]
    for i, (s, o) in enumerate(placed):
        assert o % 16 == 0 and result.spec_dict[s].mem_id == 1
        assert o + s.allocated_memory <= result.bufsizes[1]
        for t, p in placed[:i]:
            if not (s.lifetime[1] < t.lifetime[0] or t.lifetime[1] < s.lifetime[0]):
                assert o + s.allocated_memory <= p or p + t.allocated_memory <= o, (s, t)
    live = max(sum(s.allocated_memory for s in specs if s.lifetime[0] <= t <= s.lifetime[1]) for t in range(400))
    assert live <= result.bufsizes[1] <= 1.5 * live
