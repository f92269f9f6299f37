"""What a recipe part is: one small object that changes what trains in a lean graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import RecipeError
from ..graph import LeanGraph


@dataclass
class PrepareContext:
    """What parts may read or set while a model is being prepared."""

    head: str  # name of the classifier head node
    backbone_params: int  # parameter count of the backbone without its head
    seed: int = 0
    notes: dict = field(default_factory=dict)


class Part:
    """A part of a recipe. `kind` is "part" (adds trainable tensors) or "modifier" (changes how
    the others train). Parts apply before modifiers, each in the order written."""

    name = "part"
    kind = "part"

    def apply(self, graph: LeanGraph, ctx: PrepareContext) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


_REGISTRY: dict[str, Callable[[str], Part | None]] = {}


def register(factory: Callable[[str], Part | None]) -> Callable[[str], Part | None]:
    """Register a factory that returns a Part when it recognises a recipe token, else None."""
    _REGISTRY[factory.__module__.rsplit(".", 1)[-1]] = factory
    return factory


def part_from_token(token: str) -> Part:
    for factory in _REGISTRY.values():
        part = factory(token)
        if part is not None:
            return part
    raise RecipeError(f"unknown recipe part '{token}'; known: {', '.join(known_tokens())}")


def known_tokens() -> list[str]:
    return [getattr(f, "token", name) for name, f in _REGISTRY.items()]
