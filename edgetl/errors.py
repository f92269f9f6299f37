"""edgetl's own exceptions: each names the problem in one line."""


class EdgeTLError(ValueError):
    """Base class of every error edgetl raises on bad input."""


class UnsupportedLayerError(EdgeTLError):
    """The model uses an op the lean training step has no backward rule for. Names the first
    one (the op, why, its module and its place in the user's source) and counts the others that
    do not merely depend on it."""

    def __init__(self, op: str, reason: str, module: str = "", module_type: str = "", where: str = "",
                 others: int = 0):
        self.op, self.reason, self.module, self.module_type, self.where, self.others = (
            op, reason, module, module_type, where, others)
        at = f" in {module_type or 'module'} '{module}'" if module else ""
        src = f" at {where}" if where else ""
        more = f"; and {others} other unsupported op{'s' if others != 1 else ''}" if others else ""
        super().__init__(f"unsupported op {op}{at}{src}: {reason}{more}")


class RecipeError(EdgeTLError):
    """A recipe string names unknown parts or combines them in a way that cannot work."""
