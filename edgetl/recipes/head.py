"""`head`: only the new classifier head trains (a linear probe). Every recipe trains the head;
this part adds nothing else."""
from .base import Part, PrepareContext, register


class Head(Part):
    name = "head"

    def apply(self, graph, ctx: PrepareContext) -> None:
        pass


@register
def head(token: str):
    return Head() if token == "head" else None


head.token = "head"
