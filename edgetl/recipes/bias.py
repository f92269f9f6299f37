"""`bias`: the bias of every frozen conv/linear trains (with BatchNorm folded in, that bias is
the BN shift): TinyTL's bias update and MobileTL's norm shift. On a transformer this is BitFit
(every bias) plus the shift of every LayerNorm / GroupNorm (their "bias" role); their scales,
position embeddings, class tokens and layer scales stay frozen."""
from .base import Part, PrepareContext, register


class Bias(Part):
    name = "bias"

    def apply(self, graph, ctx: PrepareContext) -> None:
        for n in graph.nodes:
            t = n.params.get("bias")
            if t is not None and n.name != ctx.head and t not in graph.trainable:
                graph.trainable.append(t)


@register
def bias(token: str):
    return Bias() if token == "bias" else None


bias.token = "bias"
