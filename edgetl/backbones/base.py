"""The Backbone record every loader returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EdgeTLError


@dataclass(frozen=True)
class Backbone:
    """A classifier network plus what is needed to feed it and to cut it into blocks.

    `model` is in eval mode; inputs are `(x01 - mean) / std` per channel with x01 in [0, 1].
    `head` names the classifier (the final nn.Linear, or a 1×1 conv; "" to let prepare find it);
    `blocks` are module-name prefixes in forward order. `input_shape`, when set, is one sample's
    default shape ((C, H, W) or (C, L)), else (in_channels, input_size, input_size).
    """

    name: str
    model: nn.Module
    input_size: int
    in_channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str
    pretrained: bool
    blocks: tuple[str, ...]
    input_shape: tuple[int, ...] | None = None

    def block_of(self, module: str) -> int:
        """Index of the block that `module` belongs to, -1 if none."""
        for i, prefix in enumerate(self.blocks):
            if module == prefix or module.startswith(prefix + "."):
                return i
        return -1

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Apply the preprocessing to an (N, C, H, W) batch in [0, 1]."""
        shape = (1, -1, *[1] * (x01.dim() - 2))
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(shape)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(shape)
        return (x01 - mean) / std


def check_backbone(bb: Backbone) -> Backbone:
    """Raise EdgeTLError unless the head (when named) is an nn.Linear or Conv2d and every other
    conv/linear layer is in exactly one block."""
    modules = dict(bb.model.named_modules())
    if bb.head and not isinstance(modules.get(bb.head), (nn.Linear, nn.Conv2d)):
        raise EdgeTLError(f"backbone '{bb.name}': head '{bb.head}' is not an nn.Linear or Conv2d of the model")
    if len(bb.mean) != bb.in_channels or len(bb.std) != bb.in_channels:
        raise EdgeTLError(f"backbone '{bb.name}': mean/std need {bb.in_channels} values")
    for prefix in bb.blocks:
        if prefix not in modules:
            raise EdgeTLError(f"backbone '{bb.name}': block '{prefix}' is not a module of the model")
    for name, m in modules.items():
        if name == bb.head or not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        owners = [p for p in bb.blocks if name == p or name.startswith(p + ".")]
        if len(owners) != 1:
            raise EdgeTLError(f"backbone '{bb.name}': layer '{name}' belongs to {len(owners)} blocks, not 1")
    return bb
