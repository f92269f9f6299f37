"""A backward gradient carried as near-equal parts along the batch instead of one tensor (see
`Lowering.batch_parts_carried`): each part is made when its turn comes and runs through the per-sample rules that
follow on its own, so one part's gradients flow through the chain at a time (each part's gradient at the chain's end
lives on, as a part, until every part has run the chain)."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

Tensor = torch.Tensor


class BatchParts:
    """A batch-first value as its consecutive parts along dim 0, each made by its function when asked for."""

    def __init__(self, sizes: list[int], makers: list[Callable[[], Tensor]]):
        self.sizes, self.makers = list(sizes), list(makers)
        self.made: list[Tensor] = []  # the parts that exist already (`of`)

    @classmethod
    def of(cls, parts: list[Tensor]) -> "BatchParts":
        """Parts already made."""
        out = cls([int(p.shape[0]) for p in parts], [lambda p=p: p for p in parts])
        out.made = list(parts)
        return out

    @classmethod
    def split(cls, v: Tensor, sizes: list[int], fn: Callable[[Tensor], Tensor]) -> "BatchParts":
        """`fn` of each of v's consecutive batch parts of `sizes`, each made when asked for."""
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return cls(sizes, [lambda lo=lo, n=n: fn(v[lo : lo + n]) for lo, n in zip(starts, sizes)])

    def bounds(self) -> Iterator[tuple[int, int, Callable[[], Tensor]]]:
        """(first sample, end sample, the function making the part) of each part, in batch order."""
        lo = 0
        for n, make in zip(self.sizes, self.makers):
            yield lo, lo + n, make
            lo += n

    def joined(self) -> Tensor:
        return torch.cat([make() for make in self.makers], 0)

    def mapped(self, fn: Callable[[Tensor], Tensor]) -> "BatchParts":
        """`fn` of each part (batch-first, part by part: a reshape), each made when asked for."""
        return BatchParts(self.sizes, [lambda make=make: fn(make()) for make in self.makers])


def joined(v: Tensor | BatchParts) -> Tensor:
    """`v` as one tensor (parts joined by a cat along the batch)."""
    return v.joined() if isinstance(v, BatchParts) else v


def added(a: Tensor | BatchParts, b: Tensor | BatchParts) -> Tensor | BatchParts:
    """a + b; part by part where both are parts of the same sizes, else joined first."""
    if isinstance(a, BatchParts) and isinstance(b, BatchParts) and a.sizes == b.sizes:
        return BatchParts.of([x() + y() for x, y in zip(a.makers, b.makers)])
    return joined(a) + joined(b)
