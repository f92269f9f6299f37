"""Public architectures the tests do not write (issue 9, "done when"): each is built here from its paper or
reference code, small (32×32 input, random weights, warmed-up BatchNorm), and goes through bench/families.py's
`run_one`: prepare, export, `Trainer.fit` three steps torch-free, parameters against three torch lean steps
within 1e-4 of each parameter's largest magnitude. Kept out of the tests for CI time (one ExecuTorch export
takes 10–150 s wall on a loaded 2-core machine). Prints one JSON line per row (progress) and the table; writes
bench/results/unseen_architectures.json (rows of earlier runs not rerun are kept).

    python bench/unseen_architectures.py                                    # everything, both targets
    python bench/unseen_architectures.py --architectures elu_gelu_softplus --targets executorch --recipes side,full
    python bench/unseen_architectures.py --render --benchmarks              # the table again, also into BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from families._common import build  # noqa: E402  (tests/families: the same BatchNorm warm-up as the family models)

# bench/families.py under another name: `families` is the tests' package above
_spec = importlib.util.spec_from_file_location("bench_families", ROOT / "bench" / "families.py")
bench_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_families)
RECIPES, TARGETS = bench_families.RECIPES, bench_families.TARGETS

RESULTS = ROOT / "bench" / "results" / "unseen_architectures.json"
INPUT = (3, 32, 32)
NUM_CLASSES = 10


def conv_bn_act(i: int, o: int, k: int | tuple[int, int] = 3, s: int = 1, g: int = 1,
                act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) → BatchNorm → activation, as every paper below."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return nn.Sequential(nn.Conv2d(i, o, (kh, kw), s, (kh // 2, kw // 2), groups=g, bias=False),
                         nn.BatchNorm2d(o), act())


# --- MobileNetV1: Howard et al. 2017, "MobileNets" (Table 1): 3×3 depthwise → BN → ReLU,
# 1×1 pointwise → BN → ReLU.
def mobilenet_v1() -> nn.Module:
    layers: list[nn.Module] = [conv_bn_act(3, 8, s=2)]
    for i, o, s in [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]:
        layers += [conv_bn_act(i, i, 3, s, g=i), conv_bn_act(i, o, 1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, NUM_CLASSES))


# --- EfficientNetV2: Tan & Le 2021 (Fig. 2, Table 4): fused-MBConv (3×3 expand conv) in the early stages,
# MBConv (1×1 expand, 3×3 depthwise, squeeze-excite with SiLU and a Sigmoid gate) later; SiLU throughout.
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class FusedMBConv(nn.Module):
    def __init__(self, i: int, o: int, expand: int, stride: int) -> None:
        super().__init__()
        self.conv = conv_bn_act(i, i * expand, 3, stride, act=nn.SiLU)
        self.project = nn.Sequential(nn.Conv2d(i * expand, o, 1, bias=False), nn.BatchNorm2d(o))
        self.residual = stride == 1 and i == o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv(x))
        return x + y if self.residual else y


class MBConv(nn.Module):
    def __init__(self, i: int, o: int, expand: int, stride: int) -> None:
        super().__init__()
        m = i * expand
        self.expand = conv_bn_act(i, m, 1, act=nn.SiLU)
        self.depthwise = conv_bn_act(m, m, 3, stride, g=m, act=nn.SiLU)
        self.se = SqueezeExcite(m, max(1, i // 4))
        self.project = nn.Sequential(nn.Conv2d(m, o, 1, bias=False), nn.BatchNorm2d(o))
        self.residual = stride == 1 and i == o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


def efficientnet_v2() -> nn.Module:
    return nn.Sequential(conv_bn_act(3, 8, s=2, act=nn.SiLU), FusedMBConv(8, 8, 1, 1), FusedMBConv(8, 16, 4, 2),
                         MBConv(16, 24, 4, 2), MBConv(24, 24, 4, 1), conv_bn_act(24, 64, 1, act=nn.SiLU),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES))


# --- Inception-v3: Szegedy et al. 2016, "Rethinking the Inception Architecture" (Fig. 6, torchvision InceptionC):
# factorised 1×7 / 7×1 convolutions, a 3×3 average-pool branch, concat; 3×3/s2 max pool in the stem.
class InceptionC(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.branch1x1 = conv_bn_act(i, 8, 1)
        self.branch7x7 = nn.Sequential(conv_bn_act(i, 8, 1), conv_bn_act(8, 8, (1, 7)), conv_bn_act(8, 8, (7, 1)))
        self.branch_pool = conv_bn_act(i, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch7x7(x),
                          self.branch_pool(F.avg_pool2d(x, 3, 1, 1))], 1)


def inception_v3() -> nn.Module:
    return nn.Sequential(conv_bn_act(3, 16, 3, 2), nn.MaxPool2d(3, 2), InceptionC(16), InceptionC(24),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(24, NUM_CLASSES))


# --- CSPDarknet: Wang et al. 2020 "CSPNet" and YOLOv4 (Bochkovskiy et al. 2020): split the stage's channels,
# transform one half with a residual bottleneck, merge by concat and a 1×1 transition; Mish (Misra 2019).
class CrossStagePartial(nn.Module):
    def __init__(self, c: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.split_conv = conv_bn_act(c, c, 1, act=act)
        self.block = nn.Sequential(conv_bn_act(c // 2, c // 2, 1, act=act), conv_bn_act(c // 2, c // 2, 3, act=act))
        self.transition = conv_bn_act(c, c, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.split_conv(x).chunk(2, 1)
        return self.transition(torch.cat([p, q + self.block(q)], 1))


def cspdarknet(act: Callable[[], nn.Module] = nn.Mish) -> nn.Module:
    return nn.Sequential(conv_bn_act(3, 16, 3, 2, act=act), CrossStagePartial(16, act),
                         conv_bn_act(16, 32, 3, 2, act=act), CrossStagePartial(32, act), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, NUM_CLASSES))


def cspdarknet_leaky() -> nn.Module:
    """The YOLOv4 neck's activation, LeakyReLU(0.1), in place of Mish."""
    return cspdarknet(lambda: nn.LeakyReLU(0.1))


# --- VGG-11 with BatchNorm: Simonyan & Zisserman 2015 (config A), torchvision `vgg11_bn`: 3×3 conv → BN →
# ReLU(inplace), 2×2 max pools, adaptive average pool, a three-Linear classifier with ReLU and Dropout.
def vgg11_bn() -> nn.Module:
    layers: list[nn.Module] = []
    i = 3
    for v in [8, "M", 16, "M", 32, 32, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(i, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            i = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(True),
                         nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, NUM_CLASSES))


# --- Pre-activation ResNet: He et al. 2016, "Identity Mappings in Deep Residual Networks" (Fig. 4e):
# BN → ReLU → conv, twice, the projection shortcut taken from the pre-activated input; BN → ReLU before pooling.
class PreActBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(i, o, 1, stride, bias=False) if stride != 1 or i != o else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


def preact_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), PreActBlock(16, 16, 1), PreActBlock(16, 32, 2),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, NUM_CLASSES))


# --- HRNet fuse (Wang et al. 2020, "Deep High-Resolution Representation Learning", Fig. 3), written with
# F.interpolate(scale_factor=2, nearest) and a mean over H, W in place of the tests' nn.Upsample / bilinear.
class HighResolutionFuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.high, self.low = conv_bn_act(3, 16, 3, 2), conv_bn_act(16, 16), conv_bn_act(16, 32, 3, 2)
        self.low_to_high = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        fused = F.relu(self.high(x) + F.interpolate(self.low_to_high(self.low(x)), scale_factor=2, mode="nearest"))
        return self.head(fused.mean((2, 3)))


# --- Smooth activations of the literature in one plain CNN: ELU (Clevert et al. 2016), GELU (Hendrycks & Gimpel
# 2016), Softplus, with global max pooling (`nn.AdaptiveMaxPool2d(1)`) before the classifier.
def elu_gelu_softplus() -> nn.Module:
    return nn.Sequential(conv_bn_act(3, 16, act=nn.ELU), conv_bn_act(16, 16, act=nn.GELU), nn.MaxPool2d(2),
                         conv_bn_act(16, 32, act=nn.Softplus), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(32, NUM_CLASSES))


# --- ConvMixer: Trockman & Kolter 2022, "Patches Are All You Need?" (Fig. 2, their reference code): p×p patch
# conv → GELU → BN, then depth × [residual(depthwise k×k 'same' conv → GELU → BN), 1×1 conv → GELU → BN].
class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def convmixer(dim: int = 32, depth: int = 3, kernel: int = 5, patch: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(dim),
        *[nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"), nn.GELU(),
                                               nn.BatchNorm2d(dim))),
                        nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, NUM_CLASSES))


# --- ConvNeXt: Liu et al. 2022, "A ConvNet for the 2020s", as the official code (facebookresearch/ConvNeXt) writes
# it: its channels-first LayerNorm computed by hand (mean, pow, sqrt), 7×7 depthwise conv, channels-last LayerNorm,
# Linear 4× → GELU → Linear, layer scale, DropPath (identity in eval), a LayerNorm + 2×2/s2 conv downsample.
class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 0.1, drop_path: float = 0.1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = (self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))).permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:  # stochastic depth, per sample
            keep = torch.rand(x.shape[0], 1, 1, 1) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))
        self.stage0 = ConvNeXtBlock(dims[0])
        self.downsample = nn.Sequential(ChannelsFirstLayerNorm(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage1 = ConvNeXtBlock(dims[1])
        self.norm, self.head = nn.LayerNorm(dims[1], eps=1e-6), nn.Linear(dims[1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.downsample(self.stage0(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# --- SE-ResNet-D: He et al. 2019, "Bag of Tricks" (ResNet-D: the shortcut downsamples by a 2×2 average pool,
# ceil_mode, count_include_pad=False, before its 1×1 conv) with Hu et al. 2018's squeeze-excite (ReLU, Sigmoid)
# in each basic block, as timm's `seresnet` / `resnet*d` write them; deep stem of three 3×3 convs, 3×3/s2/p1 max pool.
class SEBasicBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn_act(i, o, 3, stride), nn.Sequential(nn.Conv2d(o, o, 3, 1, 1, bias=False),
                                                                            nn.BatchNorm2d(o))
        self.se_reduce, self.se_expand = nn.Conv2d(o, max(4, o // 16), 1), nn.Conv2d(max(4, o // 16), o, 1)
        self.downsample = None
        if stride != 1 or i != o:
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        y = y * self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))).sigmoid()
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def se_resnet_d() -> nn.Module:
    stem = nn.Sequential(conv_bn_act(3, 8, 3, 2), conv_bn_act(8, 8), conv_bn_act(8, 16), nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(stem, SEBasicBlock(16, 16, 1), SEBasicBlock(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, NUM_CLASSES))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v1": mobilenet_v1,
    "efficientnet_v2": efficientnet_v2,
    "inception_v3": inception_v3,
    "cspdarknet_mish": cspdarknet,
    "cspdarknet_leaky": cspdarknet_leaky,
    "vgg11_bn": vgg11_bn,
    "preact_resnet": preact_resnet,
    "hrnet_fuse": HighResolutionFuse,
    "elu_gelu_softplus": elu_gelu_softplus,
    "convmixer": convmixer,
    "convnext": ConvNeXt,
    "se_resnet_d": se_resnet_d,
}


def factory(name: str) -> Callable[[], nn.Module]:
    """`run_one`'s model factory: seeded construction, warmed-up BatchNorm, eval mode, `input_shape` set."""
    return lambda: build(ARCHITECTURES[name], INPUT)


def table(rows: list[dict]) -> str:
    """Architecture × recipe × target: ✓ and the max relative parameter error, – n/a, ✗ failed, ≠ off."""
    cols = [(r, t) for t in TARGETS for r in RECIPES]
    lines = ["| architecture | " + " | ".join(f"{r} {'ET' if t == 'executorch' else t}" for r, t in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for a in ARCHITECTURES:
        cells = []
        for r, t in cols:
            x = next((x for x in rows if x["architecture"] == a and x["recipe"] == r and x["target"] == t), None)
            cells.append(" " if x is None else _cell(x))
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    bad = [x for x in rows if x["status"] in ("failed", "mismatch")]
    lines += [""] + [f"- {x['architecture']} {x['recipe']} {x['target']}: "
                     f"{x.get('error') or x.get('max_rel_param_err')}" for x in bad]
    return "\n".join(lines).rstrip()


def _cell(row: dict) -> str:
    if row["status"] == "ok":
        return f"✓ {row['max_rel_param_err']:.0e}"
    return {"n/a": "–", "mismatch": "≠", "failed": "✗"}[row["status"]]


def _csv(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {','.join(choices)}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--architectures", type=_csv(list(ARCHITECTURES)), default=list(ARCHITECTURES),
                   help="comma-separated; default all")
    p.add_argument("--recipes", type=_csv(RECIPES), default=RECIPES, help="comma-separated; default all")
    p.add_argument("--targets", type=_csv(TARGETS), default=TARGETS, help="comma-separated; default both")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--render", action="store_true", help="print the table from --json only")
    p.add_argument("--benchmarks", action="store_true", help="also write the table into BENCHMARKS.md's section")
    args = p.parse_args(argv)
    todo = None if args.render else bench_families.grid(args.architectures, args.recipes, args.targets)
    text = bench_families.run_grid_cli(Path(args.json), todo, "architecture", factory, table)
    return _show(text, args.benchmarks)


def _show(text: str, benchmarks: bool) -> int:
    print(text)
    if benchmarks:
        bench_families.write_section(ROOT / "BENCHMARKS.md", "unseen", text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
