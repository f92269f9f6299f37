"""Backward rules, one family per file. Each declares what its backward keeps, and registers
which traced ATen ops it runs (see registry.py)."""
from .activation import ACTIVATIONS, Clamp, Hardsigmoid, Hardswish, LeakyReLU, PReLU, ReLU, ReLU6
from .base import Need, Rule
from .conv import Conv1d, Conv2d
from .linear import Linear
from .pool import AdaptiveAvgPool, AvgPool, AvgPool2d, GlobalAvgPool, MaxPool, MaxPool2d, GlobalMaxPool, Upsample
from .shape import Expand, Mean, Permute, Reshape, Select, Slice
from .smooth import ELU, SMOOTH, Mish, SiLU, Sigmoid, Softplus, Tanh
from .structural import Add, Affine, Concat, ConstOp, Div, Flatten, Identity, Mul, Pad, Sub
from .power import Pow, Rsqrt, Sqrt
from .attention import Attention, MatMul, Softmax
from .norm import GroupNorm, LayerNorm
from .param import ParamAdd, ParamConcat, ParamMul, ParamTableAdd, ParamTableMul  # after structural: its builders wrap structural's
from .smooth import GELU
from .ladder import LadderGate

__all__ = [
    "ACTIVATIONS", "AdaptiveAvgPool", "Add", "Affine", "AvgPool", "AvgPool2d", "Concat", "ConstOp", "Conv1d",
    "Conv2d", "Expand", "Flatten", "GlobalAvgPool", "Hardsigmoid", "Hardswish", "Identity", "Linear", "MaxPool",
    "MaxPool2d", "Mean", "Mul", "Need", "Pad", "Permute", "ReLU", "ReLU6", "Reshape", "Rule", "SMOOTH", "Select",
    "SiLU", "Sigmoid", "Slice", "Sub", "Tanh",
    "Attention", "GELU", "GroupNorm", "LadderGate", "LayerNorm", "MatMul", "ParamAdd", "ParamConcat", "ParamMul",
    "ParamTableAdd", "ParamTableMul", "Softmax",
    "Clamp", "ELU", "GlobalMaxPool", "LeakyReLU", "Mish", "PReLU", "Softplus", "Upsample",
    "Div", "Pow", "Rsqrt", "Sqrt",
]
