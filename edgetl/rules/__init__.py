"""Backward rules, one family per file. Each declares what its backward keeps."""
from .activation import ACTIVATIONS, Hardsigmoid, Hardswish, ReLU, ReLU6
from .base import Need, Rule
from .conv import Conv2d
from .linear import Linear
from .pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from .structural import Add, Affine, Concat, Flatten, Identity, Mul, Pad

__all__ = [
    "ACTIVATIONS", "Add", "Affine", "AvgPool2d", "Concat", "Conv2d", "Flatten", "GlobalAvgPool",
    "Hardsigmoid", "Hardswish", "Identity", "Linear", "MaxPool2d", "Mul", "Need", "Pad", "ReLU",
    "ReLU6", "Rule",
]
