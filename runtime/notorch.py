"""Make `import torch` fail in this process, so device-side code provably runs without it
(and onnxruntime's optional torch hooks stay unloaded, which keeps memory figures honest)."""
from __future__ import annotations

import importlib.abc
import sys


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"'{name}' is not available: the edgetl device runtime runs without torch")
        return None


def block_torch() -> None:
    if any(isinstance(f, _BlockTorch) for f in sys.meta_path):
        return
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported in this process")
    sys.meta_path.insert(0, _BlockTorch())
