"""The one error the datasets package raises on bad input."""

from edgetl.errors import EdgeTLError


class DatasetError(EdgeTLError):
    """A dataset spec, file or argument is unusable; the message names the problem in one line."""
