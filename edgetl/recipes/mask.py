"""`mask`: activations keep a boolean mask for their backward instead of a float tensor.
Exact for ReLU, ReLU6, Hardtanh/clamp, LeakyReLU, PReLU (slope frozen) and Hardsigmoid; Hard-Swish
uses MobileTL's sign approximation.
The mask is stored as one byte per element (bool) in the exported programs: standard ONNX ops
have no bitwise kernel that would make 8-per-byte packing pay, and the memory model counts
the bytes really stored."""
from ..rules.activation import _Activation
from .base import Part, PrepareContext, register


class Mask(Part):
    name = "mask"
    kind = "modifier"

    def apply(self, graph, ctx: PrepareContext) -> None:
        graph.mask_activations = True
        for n in graph.nodes:
            if isinstance(n.rule, _Activation):
                n.rule = n.rule.replace(mask=True)


@register
def mask(token: str):
    return Mask() if token == "mask" else None


mask.token = "mask"
