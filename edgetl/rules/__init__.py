"""Backward rules, one family per file. Each declares what its backward keeps."""
from .activation import ACTIVATIONS, Hardsigmoid, Hardswish, ReLU, ReLU6
from .base import Need, Rule
from .conv import Conv1d, Conv2d
from .linear import Linear
from .pool import AdaptiveAvgPool, AvgPool, AvgPool2d, GlobalAvgPool, MaxPool, MaxPool2d
from .smooth import SMOOTH, SiLU, Sigmoid, Tanh
from .structural import Add, Affine, Concat, Flatten, Identity, Mul, Pad

__all__ = [
    "ACTIVATIONS", "AdaptiveAvgPool", "Add", "Affine", "AvgPool", "AvgPool2d", "Concat", "Conv1d", "Conv2d",
    "Flatten", "GlobalAvgPool", "Hardsigmoid", "Hardswish", "Identity", "Linear", "MaxPool", "MaxPool2d", "Mul",
    "Need", "Pad", "ReLU", "ReLU6", "Rule", "SMOOTH", "SiLU", "Sigmoid", "Tanh",
]
