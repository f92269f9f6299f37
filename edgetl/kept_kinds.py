"""What a step's kept-for-backward memory is for, as `edgetl plan` shows it: each kept tensor is
put in one kind by the rule that keeps it and the name it keeps it under (attention probabilities,
LoRA inputs, norm statistics, GELU inputs, ...)."""
from __future__ import annotations

from .graph import LeanGraph
from .rules.activation import _Activation
from .rules.attention import Attention, MatMul, Softmax
from .rules.conv import Conv2d
from .rules.linear import Linear
from .rules.lora import LoraConv2d, LoraLinear
from .rules.norm import _Norm
from .rules.smooth import GELU, _Smooth
from .rules.structural import Identity

PROBS = "attention probabilities"
QKV = "attention q, k, v"
LORA = "LoRA inputs"
NORM = "norm x̂ and statistics"
GELU_IN = "GELU inputs"
SMOOTH = "SiLU/sigmoid/tanh/ELU/Mish/Softplus inputs"
MASKS = "ReLU-family masks or outputs"
TRAINED = "inputs of trained weights"
OTHER = "other"
KINDS = (PROBS, QKV, LORA, NORM, GELU_IN, SMOOTH, MASKS, TRAINED, OTHER)  # the order plan prints them in

_MATMUL_OPERAND = {"a": 0, "b": 1}  # MatMul keeps its first input as 'a', its second as 'b'


def _from_softmax(graph: LeanGraph, name: str) -> bool:
    """Whether the value `name` (a node's output) is a softmax's, through identities (dropout)."""
    names = {n.name: n for n in graph.nodes}
    while name in names and isinstance(names[name].rule, Identity) and names[name].inputs:
        name = names[name].inputs[0]
    return name in names and isinstance(names[name].rule, Softmax)


def kept_kind(graph: LeanGraph, node: str, name: str) -> str:
    """The kind of the tensor node `node` keeps as `name`."""
    n = graph.node(node)
    rule = n.rule
    if isinstance(rule, (LoraLinear, LoraConv2d)):
        return LORA
    if isinstance(rule, (Attention, Softmax)):
        return PROBS if name.startswith("p") else QKV
    if isinstance(rule, MatMul):  # softmax(q kᵀ) @ v written out: q, k, v and the probabilities again
        i = _MATMUL_OPERAND.get(name)
        return PROBS if i is not None and i < len(n.inputs) and _from_softmax(graph, n.inputs[i]) else QKV
    if isinstance(rule, _Norm):
        return NORM
    if isinstance(rule, GELU):
        return GELU_IN
    if isinstance(rule, _Smooth):
        return SMOOTH
    if isinstance(rule, _Activation):
        return MASKS
    if isinstance(rule, (Linear, Conv2d)):
        return TRAINED
    return OTHER
