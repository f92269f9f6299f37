"""edgetl: transfer learning on the device.

    import edgetl
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    step = pm.step_module(edgetl.OptimizerConfig.make("sgd", lr=0.05))
    pm.memory(batch_size=32).analytic_peak_bytes

The host API is imported lazily so that the torch-free parts (`edgetl.runtime`,
`edgetl.datasets`) can be imported on a device without torch.
"""
from __future__ import annotations

import importlib

from .errors import EdgeTLError, RecipeError, UnsupportedLayerError

__version__ = "0.1.0"

_LAZY = {
    "OptimizerConfig": "edgetl.optim",
    "PreparedModel": "edgetl.prepared",
    "prepare": "edgetl.prepared",
    "Recipe": "edgetl.recipes",
    "parse_recipe": "edgetl.recipes",
    "load_backbone": "edgetl.backbones",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgetl' has no attribute '{name}'")


__all__ = ["EdgeTLError", "RecipeError", "UnsupportedLayerError", "__version__", *_LAZY]
