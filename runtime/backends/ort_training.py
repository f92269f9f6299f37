"""The `ort-training` target on ONNX Runtime's training bindings. The Python package
`onnxruntime.training.api` imports torch, so this talks to the compiled bindings directly.
ORT keeps the optimizer state inside its checkpoint; get_state/set_state cover the parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle, safe_path
from ..errors import BundleError
from .base import Backend
from .onnx import session_options


class OrtTrainingBackend(Backend):
    def __init__(self, bundle: Bundle, arena: bool = False):
        super().__init__(bundle)
        from onnxruntime.capi import _pybind_state as C

        self.C = C
        ckpt = safe_path(bundle.root, "checkpoint")
        if not ckpt.is_file():
            raise BundleError("ort-training bundle lacks its 'checkpoint' file")
        self.state = C.load_checkpoint(str(ckpt))
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        so = session_options(arena)
        self.module = C.Module(str(bundle.program("training")), self.state, str(bundle.program("eval")), device, so)
        self.optimizer = C.Optimizer(str(bundle.program("optimizer")), self.state, device, so)
        self.pnames = [bundle.manifest["io"]["params"][t] for t in bundle.trainable]
        self.lr = None
        self.set_state(bundle.initial_state())

    def _run(self, train: bool, inputs: list[np.ndarray]) -> list[np.ndarray]:
        fetches = self.C.OrtValueVector()
        (self.module.train_step if train else self.module.eval_step)(inputs, fetches)
        return [fetches[i].numpy() for i in range(len(fetches))]

    def train_step(self, x, y, lr):
        if lr != self.lr:
            self.optimizer.set_learning_rate(float(lr))
            self.lr = lr
        loss, logits = self._run(True, [x, y])
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return float(loss), logits

    def logits(self, x):
        # The eval model carries the loss; labels are required but do not affect the logits.
        return self._run(False, [x, np.zeros(len(x), dtype=np.int64)])[1]

    def get_state(self):
        return {t: np.array(self.state.get_parameter(p).data.numpy()) for t, p in zip(self.bundle.trainable, self.pnames)}

    def set_state(self, state):
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        for t, p in zip(self.bundle.trainable, self.pnames):
            value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state[t], dtype=np.float32))
            self.state.copy_parameter_from(p, value._ortvalue)

    def export_inference(self, out: Path) -> list[Path]:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.module.export_model_for_inferencing(str(out), ["logits"])
        return [out]
