"""RepVGG-like, written as the reference RepVGG (DingXiaoH/RepVGG, timm `repvgg_a0` before
reparameterisation): every block sums three branches, 3×3 conv + BN, 1×1 conv + BN and, where the
shape allows, a BatchNorm of the input itself (not after a conv: not foldable, an affine), then ReLU;
AdaptiveAvgPool2d(1), `out.view(out.size(0), -1)`, Linear."""
from __future__ import annotations

from torch import Tensor, nn

from ._common import build


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
            groups: int = 1) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                        bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, groups: int = 1) -> None:
        super().__init__()
        assert kernel_size == 3 and padding == 1
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding_11, groups)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class RepVGG(nn.Module):
    def __init__(self, num_blocks: list[int], widths: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=2)
        self.stage1 = self._make_stage(widths[1], num_blocks[0], stride=2)
        self.stage2 = self._make_stage(widths[2], num_blocks[1], stride=2)
        self.stage3 = self._make_stage(widths[3], num_blocks[2], stride=2)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for stride in strides:
            blocks.append(RepVGGBlock(self.in_planes, planes, stride=stride))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def repvgg_like(num_classes: int = 10) -> nn.Module:
    """repvgg_a0's block (three branches, identity BN where shapes match), four stages, narrow."""
    return build(lambda: RepVGG([2, 2, 1], [8, 12, 16, 24], num_classes), (3, 32, 32))
