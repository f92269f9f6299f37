"""Built-in and user-defined backbones: `load_backbone("efficientnet_lite0")` or `load_backbone("net.py:build")`."""
from __future__ import annotations

from typing import Callable

from ..errors import EdgeTLError
from .base import Backbone, check_backbone
from .efficientnet_lite import efficientnet_lite0
from .mnist_cnn import mnist_cnn
from .mobilenet_v2 import mobilenet_v2
from .mobilenet_v3 import mobilenet_v3_small
from .user import is_file_spec, load_user_backbone, wrap_module

_BUILTINS: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "mnist_cnn": mnist_cnn,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
}


def available_backbones() -> list[str]:
    """Names of the built-in backbones."""
    return sorted(_BUILTINS)


def load_backbone(spec: str, pretrained: bool = True) -> Backbone:
    """Load a built-in backbone by name, or a user one given as "path/to/file.py:function".

    Backbones without available weights come back with `pretrained=False` even when asked for them.
    """
    if spec in _BUILTINS:
        return check_backbone(_BUILTINS[spec](pretrained=pretrained))
    if is_file_spec(spec):
        return check_backbone(load_user_backbone(spec, pretrained=pretrained))
    raise EdgeTLError(f"unknown backbone '{spec}'; available: {', '.join(available_backbones())} "
                      "(or 'path/to/file.py:function')")


__all__ = ["Backbone", "available_backbones", "load_backbone", "wrap_module"]
