"""edgetl's own exceptions: each names the problem in one line."""


class EdgeTLError(ValueError):
    """Base class of every error edgetl raises on bad input."""


class UnsupportedLayerError(EdgeTLError):
    """The model uses layers the lean training step has no backward rule for."""

    def __init__(self, found: list[tuple[str, str]]):
        self.found = found
        where = "; ".join(f"{kind} at '{path}'" for path, kind in found)
        super().__init__(f"unsupported layers ({len(found)}): {where}")


class RecipeError(EdgeTLError):
    """A recipe string names unknown parts or combines them in a way that cannot work."""
