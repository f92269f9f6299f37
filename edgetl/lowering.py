"""What a target needs from the lean step, given to the step instead of patched into it.

One frozen `Lowering` per target (the exporter of each target owns its instance): the step
(`LeanStep`, `LeanEval`), its program and the rules read it; nothing is changed class-wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .quant import dequantize_per_channel

Tensor = torch.Tensor


@dataclass(frozen=True)
class Lowering:
    # int8 + per-channel scale -> fp32, as the target's runtime spells it (ONNX: DequantizeLinear)
    dequantize: Callable[[Tensor, Tensor], Tensor] = dequantize_per_channel
    # a trainable bias of a frozen-weight linear as an add after the bias-free op (ExecuTorch's
    # XNNPACK would bake a bias fused into the op into its packed weights)
    bias_as_add: bool = False
    # exact zeros made from data (the op's input, kept masks) that pin what a graph runtime with
    # its own scheduler (onnxruntime) would otherwise run early: dequantizing a frozen weight, a
    # mask only the backward reads. Eager torch and ExecuTorch run the step as written.
    pin_schedule: bool = False
    # dequantize a large frozen int8 weight in row blocks (output channels / features) of at most
    # this many fp32 bytes, each used and dropped before the next is made, instead of one fp32
    # copy of the whole weight while its op runs (microcontrollers: that copy is the step's peak).
    # None: whole weights. Exact up to fp32 summation order (input gradients add per-block parts).
    weight_block_bytes: int | None = None
    # a conv bias's gradient summed over positions, then over the batch: onnxruntime's ReduceSum over
    # axes (0, 2, 3) is ~2x slower than the two; ExecuTorch plans the reshaped gradient as a copy
    # (+23% planned memory on a ReLU6 CNN's `bias+mask` step), so it keeps the one sum
    two_step_bias_sum: bool = False

    def row_blocks(self, graph) -> dict[str, list[tuple[int, int]]]:
        """The frozen tensors of `graph` this lowering dequantizes in row blocks, each as its
        [lo, hi) row ranges: int8 weights larger than the block whose every user can run by rows."""
        if self.weight_block_bytes is None:
            return {}
        users: dict[str, list] = {}
        for n in graph.nodes:
            for role, t in n.params.items():
                users.setdefault(t, []).append((n.rule, role))
        out = {}
        for t, us in users.items():
            shape = tuple(graph.tensors[t].shape)
            row = 4 * graph.tensors[t][0].numel() if shape else 0
            if not graph.is_quantized(t) or not row or shape[0] * row <= self.weight_block_bytes \
                    or not all(rule.by_rows(role) for rule, role in us):
                continue
            rows = max(1, self.weight_block_bytes // row)
            out[t] = [(lo, min(lo + rows, shape[0])) for lo in range(0, shape[0], rows)]
        return out


EAGER = Lowering()
# onnxruntime's schedule (the `onnx` target's step, less its dequantize op): what the analytic
# memory model follows unless it is given a target's lowering
PINNED = Lowering(pin_schedule=True, two_step_bias_sum=True)


def separate_bias(w) -> bool:
    """Whether a rule emits the bias in `w` (a node's tensors) as an add after its bias-free op:
    the target asks for it and the bias trains while the weight is frozen."""
    lowering = getattr(w, "lowering", EAGER)
    return lowering.bias_as_add and w.trainable("bias") and not w.trainable("weight")


def pins(w: Mapping[str, Tensor]) -> bool:
    """Whether a rule, given its node's tensors `w`, adds the data dependencies that pin a graph
    runtime's schedule (see `Lowering.pin_schedule`)."""
    return getattr(w, "lowering", EAGER).pin_schedule


def in_blocks(w: Mapping[str, Tensor], role: str) -> bool:
    """Whether the lowering gives the tensor in `role` of `w` (a node's tensors) by row blocks."""
    ask = getattr(w, "in_blocks", None)
    return bool(ask is not None and ask(role))


def by_rows(w: Mapping[str, Tensor], role: str, fn: Callable[[int, int, Tensor], Tensor]) -> list[Tensor]:
    """`fn(lo, hi, rows)` for the row blocks of `w[role]` the lowering asks for (the program's
    Weights make each block when reached and drop it after `fn`), else once for the whole tensor."""
    blocks = getattr(w, "row_blocks", None)
    if blocks is not None:
        return blocks(role, fn)
    t = w[role]
    return [fn(0, t.shape[0], t)]


def summed_by_rows(w: Mapping[str, Tensor], role: str, fn: Callable[[int, int, Tensor], Tensor]) -> Tensor:
    """The sum of `fn(lo, hi, rows)` over the row blocks of `w[role]` (as `by_rows`), added as
    they come (block order), so one partial result is alive beside the running sum."""
    blocks = getattr(w, "row_blocks", None)
    if blocks is not None:
        return blocks(role, fn, add=True)[0]
    t = w[role]
    return fn(0, t.shape[0], t)
