"""The attention-era family models (transformers and hybrids), kept apart from FAMILIES (the CNNs)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .convnext import convnext_like
from .deit import deit_like, deit_mean_like
from .mobilevit import mobilevit_like
from .swin import swin_like

TRANSFORMERS: dict[str, Callable[[], nn.Module]] = {
    "deit": deit_like,
    "deit_mean": deit_mean_like,
    "mobilevit": mobilevit_like,
    "convnext": convnext_like,
    "swin": swin_like,
}
