"""The `onnx` target on onnxruntime's InferenceSession: the whole lean step is one program,
parameters and optimizer state go in and come back out."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from .base import HostStateBackend
from .onnx_inference import write_inference_model


def session_options(arena: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Measured on the lean step (efficientnet_lite0 128x128 b8, bias+mask): with buffer reuse on,
    # onnxruntime's planner hands small long-lived tensors (the kept masks) the large buffers of
    # freed activations, which pins them until the backward: 75-133 MB instead of 38 MB. Reuse,
    # memory patterns and the arena off, and the default order, give a peak that follows the
    # program's live set (see BENCHMARKS.md).
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = False
    so.enable_mem_reuse = False
    so.execution_order = ort.ExecutionOrder.DEFAULT
    so.log_severity_level = 3
    return so


# Common-subexpression elimination merges a value the backward recomputes from what a rule kept (SiLU's
# sigmoid(x)) with the same value in the forward, so the forward's full-size tensor stays alive until the
# backward: measured +40% peak on an EfficientNet-B0-like step (bias+mask, 64x64 b8), none without it.
TRAIN_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


class OnnxBackend(HostStateBackend):
    def __init__(self, bundle: Bundle, arena: bool = False):
        super().__init__(bundle)
        import onnxruntime as ort

        so = session_options(arena)
        providers = ["CPUExecutionProvider"]
        # from the checked bytes, not the paths: a file replaced since the bundle was loaded is not run
        self.train = ort.InferenceSession(bundle.program_bytes("train_step"), so, providers=providers,
                                          disabled_optimizers=TRAIN_DISABLED_OPTIMIZERS)
        self.eval = ort.InferenceSession(bundle.program_bytes("eval"), so, providers=providers)
        io = bundle.manifest["io"]
        self.pnames = [io["params"][t] for t in bundle.trainable]
        self.snames = [io["state"][s] for s in bundle.state_names]
        self.train_inputs = {i.name for i in self.train.get_inputs()}
        self.eval_inputs = {i.name for i in self.eval.get_inputs()}
        self.set_state(bundle.initial_state())

    def train_step(self, x, y, lr):
        feeds = {"x": x, "y": y, "lr": np.asarray(lr, dtype=np.float32),
                 **dict(zip(self.pnames, self.params)), **dict(zip(self.snames, self.state))}
        outs = self.train.run(None, {k: v for k, v in feeds.items() if k in self.train_inputs})
        n = len(self.params)
        self.params, self.state = list(outs[2 : 2 + n]), list(outs[2 + n :])
        return float(outs[0]), outs[1]

    def logits(self, x):
        feeds = {"x": x, **dict(zip(self.pnames, self.params))}
        return self.eval.run(["logits"], {k: v for k, v in feeds.items() if k in self.eval_inputs})[0]

    def export_inference(self, out: Path) -> list[Path]:
        params = dict(zip(self.pnames, self.params))
        return [write_inference_model(self.bundle.program_bytes("eval"), params, self.bundle.manifest, out)]
