"""One backend per bundle target, imported only when used."""
from __future__ import annotations

from ..bundle import Bundle
from ..targets import EXECUTORCH, ONNX, ORT_TRAINING
from .base import Backend


def make_backend(bundle: Bundle, **options) -> Backend:
    spec = bundle.spec
    if spec is ONNX:
        from .onnx import OnnxBackend as cls
    elif spec is ORT_TRAINING:
        from .ort_peer import OrtTrainingPeerBackend, bindings_here

        if bindings_here():
            from .ort_training import OrtTrainingBackend as cls
        else:  # plain onnxruntime here: ORT's training bindings run in their own Python
            cls = OrtTrainingPeerBackend
    elif spec is EXECUTORCH:
        from .executorch import ExecuTorchBackend as cls
    return cls(bundle, **options)


__all__ = ["Backend", "make_backend"]
