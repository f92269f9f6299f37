"""The device runtime's own errors (torch-free)."""


class EdgeRuntimeError(ValueError):
    """Base of every error the device runtime raises on bad input or bad files."""


class BundleError(EdgeRuntimeError):
    """A bundle is missing, corrupt, foreign, of another version, or points outside itself."""


class InputError(EdgeRuntimeError):
    """Data given to fit/evaluate/predict has the wrong shape, type, range or size."""


class CheckpointError(EdgeRuntimeError):
    """A checkpoint cannot be written or read back intact."""


class DivergenceError(EdgeRuntimeError):
    """A training step produced a non-finite loss or parameters."""


class RuntimeNotice(UserWarning):
    """Something the user should know that does not stop the run (a warning; the CLI prints it as
    one line on stderr): e.g. a corrupt newest checkpoint replaced by its previous generation."""
