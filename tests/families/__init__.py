"""Small, CPU-fast models of the CNN families people fine-tune, written from scratch in plain torch
the way their reference implementations (torchvision, timm) write them. Each factory returns an
eval-mode model with random weights, warmed-up BatchNorm statistics and an `input_shape` attribute
(per example, without the batch dimension). See README.md in this folder."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cspdarknet import cspdarknet_like
from .densenet import densenet_like
from .efficientnet import efficientnet_b0_like
from .ghostnet import ghostnet_like
from .googlenet import googlenet_like
from .hrnet import hrnet_like
from .hybrid import hybrid_like
from .kws1d import kws1d_like
from .lcnet import lcnet_like
from .mnasnet import mnasnet_like
from .mobilenetv3 import mobilenet_v3_like
from .nonsquare import nonsquare_like
from .regnet import regnet_like
from .repvgg import repvgg_like
from .res2net import res2net_like
from .resnet import resnet18_like, resnext_like
from .shufflenet import shufflenet_v2_like
from .squeezenet import squeezenet_like
from .vovnet import vovnet_like

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18_like,
    "resnext": resnext_like,
    "efficientnet_b0": efficientnet_b0_like,
    "mobilenet_v3": mobilenet_v3_like,
    "shufflenet_v2": shufflenet_v2_like,
    "squeezenet": squeezenet_like,
    "densenet": densenet_like,
    "googlenet": googlenet_like,
    "ghostnet": ghostnet_like,
    "lcnet": lcnet_like,
    "hybrid": hybrid_like,
    "regnet": regnet_like,
    "mnasnet": mnasnet_like,
    "kws1d": kws1d_like,
    "nonsquare": nonsquare_like,
    "repvgg": repvgg_like,
    "vovnet": vovnet_like,
    "res2net": res2net_like,
    "cspdarknet": cspdarknet_like,
    "hrnet": hrnet_like,
}

__all__ = ["FAMILIES"]
