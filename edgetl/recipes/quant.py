"""`q8` / `q4`: smooth activations (SiLU, Sigmoid, Tanh, GELU, ELU/SELU/CELU, Softplus, Mish), whose
derivative no mask represents, keep what their backward needs (their derivative) as 8-bit (Mesa) or
4-bit (S2A) codes with a per-channel scale and zero point instead of fp32, dequantized in the
backward. Softmax and attention keep their probabilities, and norm layers their normalized input, the
same way. An approximation: the gradient error against exact is measured in tests/test_rules_cnn.py,
tests/test_rules_activations.py and tests/test_rules_attn.py. Piecewise-linear activations are left to
`mask` (exact), so `bias+mask+q8` quantizes only what a mask cannot hold."""
import re

from ..errors import RecipeError
from ..rules.attention import _KeepsProbabilities
from ..rules.norm import _Norm
from ..rules.smooth import _Smooth
from .base import Part, PrepareContext, register


class QuantizedKeep(Part):
    kind = "modifier"

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"q{bits}"

    def apply(self, graph, ctx: PrepareContext) -> None:
        nodes = [n for n in graph.nodes if isinstance(n.rule, (_Smooth, _KeepsProbabilities, _Norm))]
        rules = [n.rule for n in nodes]
        other = next((r.quant_bits for r in rules if r.quant_bits not in (None, self.bits)), None)
        if other is not None:
            raise RecipeError(f"'{self.name}' and 'q{other}' both quantize the kept activations; keep one")
        for n in nodes:
            n.rule = n.rule.replace(quant_bits=self.bits)
        ctx.notes["quantized_keeps"] = {"bits": self.bits, "layers": len(rules)}


@register
def quant(token: str):
    m = re.fullmatch(r"q(8|4)", token)
    return QuantizedKeep(int(m.group(1))) if m else None


quant.token = "q8/q4"
