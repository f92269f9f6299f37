"""`full`: every parameter trains in fp32 (the baseline to compare against)."""
from .base import Part, PrepareContext, register


class Full(Part):
    name = "full"

    def apply(self, graph, ctx: PrepareContext) -> None:
        for n in graph.nodes:
            if n.name != ctx.head:
                graph.trainable.extend(t for t in n.params.values() if t not in graph.trainable)


@register
def full(token: str):
    return Full() if token == "full" else None


full.token = "full"
