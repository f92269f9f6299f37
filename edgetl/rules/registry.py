"""Which rule handles a traced ATen op. Each rule file registers builders next to its rule
classes:

    @handles(aten.relu.default)
    def _relu(call: Call):
        return Lowered(ReLU(), [call.act(0)])

A builder receives the op's call with its arguments resolved (activations as `Act`, parameters
and constants as `Const`, everything else as the Python values torch.export recorded) and
returns what the op's output is: a `Lowered` rule (a new node), an existing `Act` (the op is an
identity), a `Const`, `None`, or a tuple/list of those for ops with several outputs. It raises
`Unsupported(reason)` for calls its rules cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .base import Rule

aten = torch.ops.aten
BATCH = 2  # the batch size models are exported at; rules never see it (it stays -1)


class Unsupported(Exception):
    """A call no rule can run; the message says why."""


@dataclass(frozen=True)
class Act:
    """An activation: a value of the lean graph, with its per-sample shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Const:
    """A parameter, buffer or constant tensor of the model (`name`: its state-dict name, or "")."""

    value: torch.Tensor
    name: str = ""
    param: bool = False  # a parameter of the model as it is (or expanded/reshaped), not a value computed from one
    # a value gathered from the parameter `table` (named `name`) and rearranged: value == table.flatten()[pos]
    table: torch.Tensor | None = None
    pos: torch.Tensor | None = None


@dataclass
class Lowered:
    """A rule for a new node, the activations it reads and its parameters by role."""

    rule: Rule
    inputs: list[Act]
    params: dict[str, Const] = field(default_factory=dict)


@dataclass
class Call:
    op: Any
    args: tuple
    kwargs: dict
    out_shape: tuple[int, ...] | None  # per sample, of the (first) output as torch.export saw it
    module: str = ""  # path of the innermost nn.Module the op runs in
    where: str = ""  # file:line in the user's source

    def arg(self, pos: int, key: str = "", default=None):
        if len(self.args) > pos:
            return self.args[pos]
        return self.kwargs.get(key, default)

    def act(self, pos: int, key: str = "") -> Act:
        v = self.arg(pos, key)
        if not isinstance(v, Act):
            raise Unsupported(f"argument {pos} is not an activation")
        return v

    def const(self, pos: int, key: str = "") -> Const | None:
        v = self.arg(pos, key)
        if v is None or isinstance(v, Const):
            return v
        raise Unsupported(f"argument {pos} is an activation where a parameter was expected")

    def dim(self, d: int, ndim: int) -> int:
        """A dim of an activation (counted with the batch) as a per-sample dim; the batch itself
        is not one."""
        d = d % ndim
        if d == 0:
            raise Unsupported("it works across the batch dimension")
        return d - 1


Builder = Callable[[Call], Any]
_BUILDERS: dict[Any, Builder] = {}


def handles(*ops) -> Callable[[Builder], Builder]:
    """Register a builder for one or more ATen ops (OpOverloads)."""

    def deco(fn: Builder) -> Builder:
        for op in ops:
            _BUILDERS[op] = fn
        return fn

    return deco


def builder_for(op) -> Builder | None:
    return _BUILDERS.get(op)


def handled_ops() -> list[str]:
    return sorted(str(op) for op in _BUILDERS)
