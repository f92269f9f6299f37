"""`norm`: only the normalization layers' scales and shifts train (LayerNorm, GroupNorm, RMSNorm),
plus the head: a few thousand parameters on a transformer. BatchNorm is folded into its conv, so on
a CNN its shift is the conv's bias (`bias` trains it)."""
from ..errors import RecipeError
from ..rules.norm import NORMS
from .base import Part, PrepareContext, register


class Norm(Part):
    name = "norm"

    def apply(self, graph, ctx: PrepareContext) -> None:
        nodes = [n for n in graph.nodes if isinstance(n.rule, NORMS) and n.name != ctx.head]
        if not nodes:
            raise RecipeError("'norm' needs a model with LayerNorm, GroupNorm or RMSNorm layers (BatchNorm is "
                              "folded into convs: use 'bias')")
        for n in nodes:
            graph.trainable.extend(t for t in n.params.values() if t not in graph.trainable)


@register
def norm(token: str):
    return Norm() if token == "norm" else None


norm.token = "norm"
