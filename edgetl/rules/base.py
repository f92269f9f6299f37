"""The interface every layer's backward rule implements.

A rule computes its layer with ordinary torch ops (`compute`), decides what the backward keeps
(`forward` returns it), and computes input and parameter gradients from only what it kept
(`backward`). Rules are written in ops that export to ONNX and to ExecuTorch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Need:
    """Which gradients the backward of one node must produce."""

    inputs: tuple[bool, ...]
    params: frozenset[str]

    @property
    def any(self) -> bool:
        return any(self.inputs) or bool(self.params)


class Rule:
    kind = "rule"
    quantizable = False  # its "weight" may be stored int8 when frozen
    approximate = False  # its backward is an approximation of autograd's (documented per rule)
    mixes_batch = False  # its output for one sample depends on the others (batch statistics): no micro-batches
    # its backward for a batch part needs only that part of the gradient and of what it kept (batch-first), and its
    # parameter gradients add over parts (`Lowering.batch_parts_carried`). Inside such a chain (`Program.
    # _chain_by_parts`) its backward is given a plain tensor and must return plain tensors: the program hands it
    # weights whose lowering has `batch_parts_carried` off, so a rule that would carry parts of its own joins them
    per_sample = False

    in_shapes: list[tuple[int, ...]] = []
    out_shape: tuple[int, ...] = ()
    _bound = False

    def bind(self, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...] = ()) -> "Rule":
        """A copy of this rule bound to per-sample input and output shapes (fixed at prepare
        time); rules use them as Python ints so exported programs get static shapes. A bound
        rule is immutable: configure (e.g. `replace(mask=True)`) before binding."""
        bound = self.replace()
        bound.on_bind([tuple(s) for s in in_shapes], tuple(out_shape))
        bound.__dict__["_bound"] = True
        return bound

    def on_bind(self, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> None:
        """Set the shapes on a fresh copy, before it freezes. Subclasses that derive constants
        from the shapes extend this (and call super)."""
        self.in_shapes = in_shapes
        self.out_shape = out_shape

    def replace(self, **changes) -> "Rule":
        """An unbound copy with some attributes changed (how modifiers change a rule)."""
        new = copy.copy(self)
        new.__dict__.update(changes, _bound=False)
        return new

    def __setattr__(self, name, value) -> None:
        if self._bound:
            raise AttributeError(f"{type(self).__name__} is bound to its shapes and immutable; use replace()")
        object.__setattr__(self, name, value)

    def by_rows(self, role: str) -> bool:
        """Whether this rule can run with its frozen tensor in `role` given in row blocks
        (`lowering.by_rows`), so a lowering may dequantize it a block at a time."""
        return False

    def compute(self, xs: list[Tensor], w: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def reference(self, xs: list[Tensor], w: Mapping[str, Tensor]) -> Tensor:
        """The forward as torch autograd should differentiate it (the parity reference)."""
        return self.compute(xs, w)

    def forward(self, xs: list[Tensor], w: Mapping[str, Tensor], need: Need) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.compute(xs, w)
        return y, (self.keep(xs, y, w, need) if need.any else {})

    def keep(self, xs: list[Tensor], y: Tensor, w: Mapping[str, Tensor], need: Need) -> dict[str, Tensor]:
        return {}

    def backward(
        self, g: Tensor, kept: dict[str, Tensor], w: Mapping[str, Tensor], need: Need
    ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        raise NotImplementedError

    def reads_nchwc(self, need: Need) -> bool:
        """Whether onnxruntime's CPU runs this op's export in its NCHWc kernels, on a reordered copy of
        input 0 (`lowering.runs_nchwc`); the analytic replay of its schedule counts that copy (`Program`)."""
        return False

    def local_derivative(self, kept: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor] | None:
        """The part of a pointwise op's backward made from its kept tensors alone (its dy/dx), as
        the kept tensors that replace them (floats of `dtype`, the gradient's); None where the rule
        has no such part. onnxruntime's scheduler computes that part before the gradient it
        multiplies exists (the analytic replay of its schedule does too, `Program.backward`);
        `backward` uses it when given."""
        return None

    def describe(self) -> str:
        return self.kind


def sum_to(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a broadcast gradient back to a per-sample `shape` (which may have fewer dims)."""
    extra = g.dim() - 1 - len(shape)
    if extra > 0:
        g = g.sum(tuple(range(1, 1 + extra)))
    dims = [i + 1 for i, s in enumerate(shape) if s == 1 and g.shape[i + 1] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def upsample_to(g: Tensor, chw: tuple[int, int, int], k: int, hw: tuple[int, int], fill: float = 0.0) -> Tensor:
    """Repeat each element of a (N, *chw) tensor k×k times (nearest) and pad right/bottom to `hw`.
    Only the batch dimension is left to the runtime (-1), so exported shapes stay static."""
    c, ho, wo = chw
    up = g[:, :, :, None, :, None].expand(-1, c, ho, k, wo, k).reshape(-1, c, ho * k, wo * k)
    ph, pw = hw[0] - ho * k, hw[1] - wo * k
    if ph or pw:
        up = torch.nn.functional.pad(up, (0, pw, 0, ph), value=fill)
    return up
