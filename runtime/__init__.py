"""edgetl's device runtime: train an exported bundle with no PyTorch installed.

    from edgetl.runtime import Trainer
    t = Trainer.load("bundle/")
    t.fit(x_train, y_train, epochs=3, progress=True)
    t.evaluate(x_test, y_test)

Imports numpy and a runtime (onnxruntime or ExecuTorch's) only, never torch.
"""
from .bundle import Bundle, load_bundle
from .errors import BundleError, CheckpointError, DivergenceError, EdgeRuntimeError, InputError, RuntimeNotice
from .trainer import FitResult, Trainer

__all__ = ["Bundle", "BundleError", "CheckpointError", "DivergenceError", "EdgeRuntimeError", "FitResult",
           "InputError", "RuntimeNotice", "Trainer", "load_bundle"]
