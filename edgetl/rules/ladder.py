"""The gate of a ladder side network (LST, Sung et al. 2022): the side stream s and a tap's
down-projection z mix as g*s + (1-g)*z with g = sigmoid(gate), `gate` a trainable scalar (or one
per channel, broadcast from the right). Only recipes insert it (`side`); no traced op lowers to it."""
from __future__ import annotations

import torch

from .base import Rule, sum_to
from .param import _reduce_to


class LadderGate(Rule):
    """Inputs [s, z], parameter "gate". Keeps s - z (one tensor) when the gate trains."""

    kind = "ladder_gate"

    def compute(self, xs, w):
        g = torch.sigmoid(w["gate"])
        return xs[1] + g * (xs[0] - xs[1])

    def keep(self, xs, y, w, need):
        return {"diff": xs[0] - xs[1]} if "gate" in need.params else {}

    def backward(self, g, kept, w, need):
        s = torch.sigmoid(w["gate"])
        gs = sum_to(g * s, self.in_shapes[0]) if need.inputs[0] else None
        gz = sum_to(g * (1 - s), self.in_shapes[1]) if need.inputs[1] else None
        grads = {}
        if "gate" in need.params:
            grads["gate"] = _reduce_to(g * kept["diff"], tuple(w["gate"].shape)) * (s * (1 - s))
        return [gs, gz], grads
