"""CSPDarknet-like, written as the YOLOv4 backbone (CSPDarknet53, AlexeyAB/darknet, timm
`cspdarknet53` with `act_layer=Mish`) writes it: ConvBnAct (conv without bias, BatchNorm, Mish), a
3×3/s2 down-sampling conv per stage, Cross Stage Partial stages (1×1 expansion, `x.split(c, dim=1)`
into a shortcut half and a half through Darknet residual blocks, 1×1 transitions, `torch.cat`), and
YOLOv4's neck convolution with `nn.LeakyReLU(0.1, inplace=True)` before global pooling and Linear."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import build


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 act_layer: type[nn.Module] = nn.Mish) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DarkBlock(nn.Module):
    def __init__(self, chs: int, mid_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(chs, mid_chs, 1)
        self.conv2 = ConvBnAct(mid_chs, chs, 3)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv2(self.conv1(x))
        return x + shortcut


class CrossStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int) -> None:
        super().__init__()
        self.expand_chs = out_chs
        self.conv_down = ConvBnAct(in_chs, out_chs, 3, stride=2)
        self.conv_exp = ConvBnAct(out_chs, out_chs, 1)
        half = out_chs // 2
        self.blocks = nn.Sequential(*[DarkBlock(half, half) for _ in range(depth)])
        self.conv_transition_b = ConvBnAct(half, half, 1)
        self.conv_transition = ConvBnAct(out_chs, out_chs, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CSPDarknet(nn.Module):
    def __init__(self, widths: list[int], depths: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, widths[0], 3)
        chs, stages = widths[0], []
        for w, d in zip(widths[1:], depths):
            stages.append(CrossStage(chs, w, d))
            chs = w
        self.stages = nn.Sequential(*stages)
        self.neck = ConvBnAct(chs, chs, 1, act_layer=lambda: nn.LeakyReLU(0.1, inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.neck(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def cspdarknet_like(num_classes: int = 10) -> nn.Module:
    """Stem and three CSP stages (1, 2, 1 Darknet blocks), Mish; the LeakyReLU neck; narrow."""
    return build(lambda: CSPDarknet([8, 16, 16, 24], [1, 2, 1], num_classes), (3, 32, 32))
