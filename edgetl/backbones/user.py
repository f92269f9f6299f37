"""Backbones defined by the user as `path/to/file.py:function`."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path

from torch import nn

from ..errors import EdgeTLError
from .base import Backbone


def is_file_spec(spec: str) -> bool:
    """True when `spec` looks like `file.py:function` (or a bare `file.py`)."""
    file = spec.rsplit(":", 1)[0] if ":" in spec else spec
    return file.endswith(".py")


def _infer_blocks(model: nn.Module, head: str) -> tuple[str, ...]:
    """Top-level children holding Conv2d/Linear layers; the child holding the head is split into its layers."""
    blocks: list[str] = []
    for child_name, child in model.named_children():
        layers = [f"{child_name}.{n}" if n else child_name for n, m in child.named_modules()
                  if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        if head in layers:
            blocks += [name for name in layers if name != head]
        elif layers:
            blocks.append(child_name)
    return tuple(blocks)


def wrap_module(model: nn.Module, name: str, pretrained: bool = False) -> Backbone:
    """Describe a plain classifier module as a Backbone.

    The head is the last nn.Linear; without one, prepare looks for a 1×1-conv classifier. Optional
    attributes on the module override the defaults: `input_shape` (one sample, (C, H, W) or (C, L)),
    or `input_size` (224) and `in_channels` (that of the first conv, else 3); `mean` (0s), `std` (1s).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    linears = [(n, m) for n, m in layers if isinstance(m, nn.Linear)]
    head, fc = linears[-1] if linears else ("", None)
    convs = [m for _, m in layers if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    shape = getattr(model, "input_shape", None)
    shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list)) and len(shape) in (2, 3) else None
    in_channels = shape[0] if shape else int(getattr(model, "in_channels", convs[0].in_channels if convs else 3))
    return Backbone(
        name=name,
        model=model.eval(),
        input_size=shape[-1] if shape else int(getattr(model, "input_size", 224)),
        in_channels=in_channels,
        num_classes=fc.out_features if fc is not None else 0,
        mean=tuple(float(v) for v in getattr(model, "mean", (0.0,) * in_channels)),
        std=tuple(float(v) for v in getattr(model, "std", (1.0,) * in_channels)),
        head=head,
        pretrained=pretrained,
        blocks=_infer_blocks(model, head),
        input_shape=shape,
    )


def load_user_backbone(spec: str, pretrained: bool = True) -> Backbone:
    """Call `function` from `file.py` (given as "file.py:function"); it returns an nn.Module or a Backbone.

    `pretrained` is passed on when the function takes a `pretrained` argument.
    """
    if ":" not in spec or not spec.rsplit(":", 1)[1]:
        raise EdgeTLError(f"backbone '{spec}': name the function to call, as 'path/to/file.py:function'")
    file_name, func_name = spec.rsplit(":", 1)
    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise EdgeTLError(f"backbone '{spec}': file '{path}' does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"edgetl_user_backbone_{digest}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise EdgeTLError(f"backbone '{spec}': '{path.name}' has no function '{func_name}'")
    takes_pretrained = "pretrained" in inspect.signature(func).parameters
    result = func(pretrained=pretrained) if takes_pretrained else func()
    if isinstance(result, Backbone):
        result.model.eval()
        return result
    if isinstance(result, nn.Module):
        return wrap_module(result, name=f"{path.stem}:{func_name}", pretrained=pretrained and takes_pretrained)
    raise EdgeTLError(f"backbone '{spec}': '{func_name}' returned {type(result).__name__}, "
                      "not an nn.Module or a Backbone")
