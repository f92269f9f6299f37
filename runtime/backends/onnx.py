"""The `onnx` target on onnxruntime's InferenceSession: the whole lean step is one program,
parameters and optimizer state go in and come back out."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..programs import program_names
from ..targets import LOGITS
from .base import HostStateBackend, Resident, threads_from_env
from ..lora_merge import merged_weights
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
    # fold DequantizeLinear of constants (the depthwise kernels the exporter leaves unpinned) to fp32
    # constants at load: onnxruntime's fast depthwise Conv needs a constant kernel. Off by default.
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    threads = threads_from_env()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


# Common-subexpression elimination merges a value the backward recomputes from what a rule kept (SiLU's
# sigmoid(x)) with the same value in the forward, so the forward's full-size tensor stays alive until the
# backward: measured +40% peak on an EfficientNet-B0-like step (bias+mask, 64x64 b8), none without it.
TRAIN_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


class OnnxBackend(HostStateBackend):
    def __init__(self, bundle: Bundle, arena: bool = False):
        super().__init__(bundle)
        import onnxruntime as ort

        self.before_programs = Resident.now()  # the runtime's libraries loaded, no program yet
        so = session_options(arena)
        providers = ["CPUExecutionProvider"]
        # from the checked bytes, not the paths: a file replaced since the bundle was loaded is not run.
        # The eval program is checked now but opened on first use (its session holds a second copy of
        # the frozen weights: Lite0 224 side+mask, micro-batch 1, whole training memory 61.6 -> 49.6 MB)
        bundle.program_bytes("eval")
        self.train = ort.InferenceSession(bundle.program_bytes("train_step"), so, providers=providers,
                                          disabled_optimizers=TRAIN_DISABLED_OPTIMIZERS)
        self._eval = None
        self._eval_options = so
        self.pnames, snames = program_names(bundle.manifest)
        # the programs' inputs by name, in the spec's order (load_bundle checked that they exist)
        self.train_names = bundle.spec.program("train_step").input_names(self.pnames, snames)
        self.eval_names = bundle.spec.program("eval").input_names(self.pnames, snames)
        self.set_state(bundle.initial_state())

    @property
    def eval(self):
        """The eval program's session, opened on first use (from bytes checked again then)."""
        if self._eval is None:
            import onnxruntime as ort

            self._eval = ort.InferenceSession(self.bundle.program_bytes("eval"), self._eval_options,
                                              providers=["CPUExecutionProvider"])
        return self._eval

    def train_step(self, x, y, lr):
        values = [x, y, np.asarray(lr, dtype=np.float32), *self.params, *self.state]
        outs = self.train.run(None, dict(zip(self.train_names, values)))
        n = len(self.params)
        self.params, self.state = list(outs[2 : 2 + n]), list(outs[2 + n :])
        return float(outs[0]), outs[1]

    def logits(self, x):
        return self.eval.run([LOGITS], dict(zip(self.eval_names, [x, *self.params])))[0]

    def export_inference(self, out: Path) -> list[Path]:
        m = self.bundle.manifest
        if "lora" not in m:
            params = dict(zip(self.pnames, self.params))
            return [write_inference_model(self.bundle.program_bytes("eval"), params, m, out)]
        # LoRA: the updates merged into the weights of a program with the original layers
        named = dict(zip(self.bundle.trainable, self.params))
        branch = {layer[k] for layer in m["lora"]["layers"] for k in ("a", "b")}
        params = {p: v for t, p, v in zip(self.bundle.trainable, self.pnames, self.params) if t not in branch}
        params |= merged_weights(self.bundle, named)
        return [write_inference_model(self.bundle.program_bytes(m["lora"]["program"]), params, m, out)]
