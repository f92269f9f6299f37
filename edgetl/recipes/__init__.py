"""Recipes: which tiny parts of a model train. Parts combine with '+', e.g. 'bias+mask',
'side+mask', 'bias+last2'. Each part lives in its own file and registers itself."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RecipeError
from . import bias, full, head, last, lora, mask, norm, quant, side  # noqa: F401  (registers the parts)
from .base import Part, PrepareContext, known_tokens, part_from_token

BASE_PARTS = ("full", "head", "bias", "side", "lora", "norm")


@dataclass(frozen=True)
class Recipe:
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "+".join(p.name for p in self.parts)

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.parts)

    def ordered(self) -> list[Part]:
        return [p for p in self.parts if p.kind == "part"] + [p for p in self.parts if p.kind == "modifier"]

    def __str__(self) -> str:
        return self.text


def parse_recipe(text: str | Recipe) -> Recipe:
    """Parse 'bias+mask' style recipe strings, checking that the parts make sense together."""
    if isinstance(text, Recipe):
        return text
    tokens = [t.strip() for t in str(text).lower().split("+")]
    if not text or any(not t for t in tokens):
        raise RecipeError(f"empty part in recipe '{text}'")
    parts = tuple(part_from_token(t) for t in tokens)
    names = [p.name for p in parts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"recipe '{text}' names {', '.join(dup)} twice")
    if not any(n in BASE_PARTS or re.fullmatch(r"lora\d+", n) for n in names):
        raise RecipeError(f"recipe '{text}' has only modifiers; add one of {', '.join(BASE_PARTS)}")
    lasts = [p for p in parts if p.name.startswith("last")]
    if len(lasts) > 1:
        raise RecipeError(f"recipe '{text}' has more than one lastN")
    if lasts and not any(n in ("full", "bias") for n in names):
        raise RecipeError(f"'{lasts[0].name}' limits which backbone blocks train; combine it with 'bias' or 'full'")
    if "full" in names and "bias" in names:
        raise RecipeError("'full' already trains every bias; drop 'bias'")
    loras = [n for n in names if re.fullmatch(r"lora\d*", n)]
    if len(loras) > 1:
        raise RecipeError(f"recipe '{text}' has more than one lora part")
    if loras and "full" in names:
        raise RecipeError(f"'full' already trains every weight; drop '{loras[0]}'")
    if loras and lasts:
        raise RecipeError(f"'{lasts[0].name}' does not limit '{loras[0]}', which adapts every layer; drop one")
    if "full" in names and "norm" in names:
        raise RecipeError("'full' already trains every norm layer; drop 'norm'")
    return Recipe(parts)


__all__ = ["Part", "PrepareContext", "Recipe", "known_tokens", "parse_recipe"]
