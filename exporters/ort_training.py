"""The `ort-training` target: standard ONNX Runtime on-device training artifacts
(`generate_artifacts`: training, eval and optimizer models plus a checkpoint). Exactly the
recipe's trainable tensors require grad; frozen int8 weights are initializers feeding
DequantizeLinear, listed as frozen params. ORT derives the backward itself (exact rules; it has
no mask approximation and keeps what its own gradient graph needs): this is the peer baseline."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from edgetl.errors import EdgeTLError
from edgetl.interpret import computing, interpret, weights_from
from edgetl.runtime.errors import EdgeRuntimeError
from edgetl.runtime.targets import LOGITS, ORT_TRAINING, X, param_name
from edgetl.step import _FrozenStore

from .onnx import LOWERING, OPSET


class _Forward(nn.Module):
    """Logits from a batch, with trainable tensors as parameters ORT's autodiff can train."""

    def __init__(self, prepared):
        super().__init__()
        self.graph = prepared.graph
        # the onnx target's dequantize op (ORT derives the backward and schedules it itself)
        self.store = _FrozenStore(prepared, LOWERING)
        init = prepared.initial_params()
        # `param` makes the exporter name them param.0, param.1, ...: the spec's names (checked below)
        self.param = nn.ParameterList([nn.Parameter(init[t]) for t in prepared.trainable])
        self.index = {t: i for i, t in enumerate(prepared.trainable)}

    def forward(self, x):
        params = {t: self.param[i] for t, i in self.index.items()}
        return interpret(self.graph, x, computing(weights_from(params, self.store.get)))


@contextlib.contextmanager
def _quiet_stderr():
    """generate_artifacts logs every graph transformer at info level from C++, whatever the
    Python-side severity; silence the process's stderr while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _generate_artifacts(model: onnx.ModelProto, spec: dict) -> None:
    """generate_artifacts here where ORT's training bindings are installed, else in the ort-training
    peer Python (plain onnxruntime here; see edgetl.runtime.backends.ort_peer)."""
    from edgetl.runtime.backends.ort_peer import bindings_here, peer_python

    from . import ort_artifacts

    with tempfile.TemporaryDirectory(prefix="edgetl-ort-export-") as tmp:
        spec = {**spec, "model": os.path.join(tmp, "forward.onnx")}
        onnx.save(model, spec["model"])
        if bindings_here():
            with _quiet_stderr():
                ort_artifacts.generate(**spec)
            return
        try:
            python = peer_python()
        except EdgeRuntimeError as e:
            raise EdgeTLError(str(e)) from None
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        r = subprocess.run([str(python), "-I", ort_artifacts.__file__, f.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise EdgeTLError("ONNX Runtime's generate_artifacts failed: "
                              + " ".join(r.stderr.split())[-400:])


def export_ort_training(prepared, optimizer, batch_size: int, out: Path) -> dict:
    if optimizer.name == "sgd" and optimizer.momentum:
        raise EdgeTLError("ONNX Runtime's on-device SGD has no momentum: use momentum 0 or the adamw optimizer "
                          "for the ort-training target")
    if optimizer.name == "sgd" and optimizer.weight_decay:
        raise EdgeTLError("ONNX Runtime's on-device SGD has no weight decay: use 0 or the adamw optimizer")
    fwd = _Forward(prepared).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TRAINING mode: the exporter must not merge trainable tensors that happen to be equal
        # (e.g. zero biases) into one initializer. The forward has no dropout or batch norm.
        torch.onnx.export(fwd, (torch.zeros(batch_size, *prepared.graph.input_shape),), buf, input_names=[X], output_names=[LOGITS],
                          opset_version=OPSET, do_constant_folding=False, dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING,
                          dynamic_axes={X: {0: "batch"}, LOGITS: {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    inits = [i.name for i in model.graph.initializer]
    pnames = [param_name(i) for i in range(len(prepared.trainable))]
    missing = [p for p in pnames if p not in inits]
    if missing:
        raise EdgeTLError(f"internal: trainable tensors {missing[:3]} are not initializers of the ONNX model")
    frozen = [i for i in inits if i not in pnames]
    spec = {"requires_grad": pnames, "frozen": frozen, "out": str(Path(out).resolve()), "optimizer": {"name": optimizer.name},
            "outputs": [LOGITS]}
    if optimizer.name == "adamw":
        spec["optimizer"].update(beta1=optimizer.beta1, beta2=optimizer.beta2, eps=optimizer.eps,
                                 weight_decay=optimizer.weight_decay)
    _generate_artifacts(model, spec)
    for rel in [*ORT_TRAINING.program_files().values(), *ORT_TRAINING.files]:  # generate_artifacts' own names
        if not (out / rel).is_file():
            raise EdgeTLError(f"internal: generate_artifacts did not write {rel}")
    return {}
