"""`lastN`: only the last N blocks of the backbone train (plus the head and any side network);
the backward stops where nothing earlier trains."""
import re

from ..errors import RecipeError
from .base import Part, PrepareContext, register


class LastBlocks(Part):
    kind = "modifier"

    def __init__(self, n: int):
        if n < 1:
            raise RecipeError(f"'last{n}': N must be at least 1")
        self.n = n
        self.name = f"last{n}"

    def apply(self, graph, ctx: PrepareContext) -> None:
        nblocks = len(graph.blocks)
        if self.n > nblocks:
            raise RecipeError(f"'{self.name}': the backbone has only {nblocks} blocks")
        first = nblocks - self.n
        frozen = {t for n in graph.nodes if n.name != ctx.head and n.block >= 0 and n.block < first
                  for t in n.params.values()}
        frozen |= {t for n in graph.nodes if n.block < 0 and n.name != ctx.head and not n.module.startswith("side.")
                   and n.params for t in n.params.values() if _before_first(graph, n, first)}
        graph.trainable[:] = [t for t in graph.trainable if t not in frozen]
        ctx.notes["trainable_blocks"] = graph.blocks[first:]


def _before_first(graph, node, first: int) -> bool:
    """A parameterized node outside every block counts as frozen when it comes before the first trained block."""
    for n in graph.nodes:
        if n is node:
            return True
        if n.block >= first:
            return False
    return True


@register
def last(token: str):
    m = re.fullmatch(r"last(\d+)", token)
    return LastBlocks(int(m.group(1))) if m else None


last.token = "lastN"
