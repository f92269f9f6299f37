"""VoVNet-like, written as timm `ese_vovnet19b_slim` (timm.models.vovnet): a stem of strided
ConvNormAct, One-Shot-Aggregation modules (a chain of 3×3 ConvNormAct whose outputs and the block
input are concatenated once, `torch.cat(concat_list, dim=1)`, then a 1×1 ConvNormAct), effective
Squeeze-Excite (`x.mean((2, 3), keepdim=True)` → 1×1 conv → hard_sigmoid gate, `x * gate`), stages
opened by `MaxPool2d(3, 2, ceil_mode=True)`, a residual in the repeated blocks, timm's
SelectAdaptivePool2d + Linear head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import build
from ._timm_layers import BatchNormAct2d, Linear, SelectAdaptivePool2d


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = BatchNormAct2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def hard_sigmoid(x: Tensor, inplace: bool = False) -> Tensor:
    """timm.layers.activations.hard_sigmoid."""
    return F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return hard_sigmoid(x)


class EffectiveSEModule(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0)
        self.gate = HardSigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc(x_se)
        return x * self.gate(x_se)


class OsaBlock(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, layer_per_block: int, residual: bool = False,
                 attn: bool = True) -> None:
        super().__init__()
        self.residual = residual
        next_in_chs = in_chs
        self.conv_mid = nn.Sequential()
        for i in range(layer_per_block):
            self.conv_mid.add_module(f"conv{i}", ConvNormAct(next_in_chs, mid_chs, 3))
            next_in_chs = mid_chs
        next_in_chs = in_chs + layer_per_block * mid_chs
        self.conv_concat = ConvNormAct(next_in_chs, out_chs)
        self.attn = EffectiveSEModule(out_chs) if attn else None

    def forward(self, x: Tensor) -> Tensor:
        output = [x]
        for conv in self.conv_mid:
            x = conv(x)
            output.append(x)
        x = torch.cat(output, dim=1)
        x = self.conv_concat(x)
        if self.attn is not None:
            x = self.attn(x)
        if self.residual:
            x = x + output[0]
        return x


class OsaStage(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, block_per_stage: int, layer_per_block: int,
                 downsample: bool = True) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True) if downsample else None
        blocks = []
        for i in range(block_per_stage):
            blocks.append(OsaBlock(in_chs if i == 0 else out_chs, mid_chs, out_chs, layer_per_block,
                                   residual=i > 0))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.blocks(x)


class VovNet(nn.Module):
    def __init__(self, num_classes: int = 10, stem: int = 12, mid: tuple[int, ...] = (8, 12, 16),
                 out: tuple[int, ...] = (16, 24, 32), blocks: tuple[int, ...] = (1, 2, 1), layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, stem // 2, 3, stride=2), ConvNormAct(stem // 2, stem // 2, 3),
                                  ConvNormAct(stem // 2, stem, 3, stride=2))
        in_chs = stem
        stages = []
        for i, (m, o, b) in enumerate(zip(mid, out, blocks)):
            stages.append(OsaStage(in_chs, m, o, b, layers, downsample=i > 0))
            in_chs = o
        self.stages = nn.Sequential(*stages)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = Linear(in_chs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.fc(self.global_pool(x))


def vovnet_like(num_classes: int = 10) -> nn.Module:
    """ese_vovnet19b_slim's layout (3-conv stem, OSA stages with eSE, ceil-mode max pools), narrow."""
    return build(lambda: VovNet(num_classes), (3, 32, 32))
