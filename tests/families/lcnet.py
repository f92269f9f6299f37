"""LCNet-like, written as timm's MobileNetV3 class with the lcnet_050 arch (DepthwiseSeparableConv
blocks with timm BatchNormAct2d + Hardswish, SE with ReLU and a hard-sigmoid gate,
SelectAdaptivePool2d, a conv head with bias, nn.Flatten, timm Linear classifier)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._common import build
from ._timm_layers import BatchNormAct2d, Linear, SelectAdaptivePool2d, SqueezeExcite, make_divisible


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1, noskip: bool = False,
                 pw_act: bool = False, act_layer=nn.ReLU, se_layer=None) -> None:
        super().__init__()
        norm_act_layer = partial(BatchNormAct2d, act_layer=act_layer)
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        padding = ((stride - 1) + (dw_kernel_size - 1)) // 2  # timm's get_padding for padding=''
        self.conv_dw = nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, padding, groups=in_chs, bias=False)
        self.bn1 = norm_act_layer(in_chs, inplace=True)
        self.aa = nn.Identity()
        self.se = se_layer(in_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = norm_act_layer(out_chs, inplace=True, apply_act=self.has_pw_act)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class _ForcedReluSE(SqueezeExcite):
    """timm builds LCNet's SE with force_act_layer=nn.ReLU: the block's Hardswish is ignored."""

    def __init__(self, in_chs: int, act_layer=None) -> None:
        super().__init__(in_chs, rd_ratio=0.25, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid,
                         rd_round_fn=partial(make_divisible, divisor=8))


class LCNet(nn.Module):
    """timm MobileNetV3 with LCNet's arch: stem conv + BatchNormAct2d, stages of 'dsa' blocks (pw act, no skip)."""

    def __init__(self, stages: list[list[tuple[int, int, int, bool]]], num_classes: int = 10, stem_size: int = 8,
                 num_features: int = 64, drop_rate: float = 0.2) -> None:
        super().__init__()
        act_layer = nn.Hardswish
        self.drop_rate = drop_rate
        self.conv_stem = nn.Conv2d(3, stem_size, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(stem_size, act_layer=act_layer, inplace=True)
        blocks = []
        in_chs = stem_size
        for stage in stages:
            layers = []
            for k, s, c, se in stage:
                layers.append(DepthwiseSeparableConv(in_chs, c, k, s, noskip=True, pw_act=True, act_layer=act_layer,
                                                     se_layer=_ForcedReluSE if se else None))
                in_chs = c
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg")
        self.conv_head = nn.Conv2d(in_chs, num_features, 1, bias=True)
        self.norm_head = nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.norm_head(x)
        x = self.act2(x)
        x = self.flatten(x)
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def lcnet_like(num_classes: int = 10) -> nn.Module:
    """lcnet_050's stage pattern (k, stride, channels, se), narrow."""
    stages = [
        [(3, 1, 16, False)],
        [(3, 2, 24, False), (3, 1, 24, False)],
        [(3, 2, 32, False)],
        [(5, 2, 48, False)],
        [(5, 2, 64, True)],
    ]
    return build(lambda: LCNet(stages, num_classes), (3, 32, 32))
