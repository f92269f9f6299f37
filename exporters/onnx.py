"""The `onnx` target: the lean step as one ordinary ONNX model (opset 17) that any
onnxruntime InferenceSession runs, plus an eval program (logits from batch and params).
Frozen int8 weights are initializers feeding DequantizeLinear."""
from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import onnx
import torch

from edgetl.lowering import PINNED
from edgetl.quant import dequantize_per_channel
from edgetl.runtime.targets import LOGITS, ONNX, X, param_name, state_name
from edgetl.step import LeanEval, LeanStep

from .lora import LORA_FILE, merged_model, write_lora_file
from .onnx_passes import crop_into_conv_transpose, fuse_pad_into_conv, rank_match_scalars

OPSET = 17


class _DequantizeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale):
        return dequantize_per_channel(q, scale)

    @staticmethod
    def symbolic(g, q, scale):
        zero = g.op("Constant", value_t=torch.zeros(scale.type().sizes(), dtype=torch.int8))
        return g.op("DequantizeLinear", q, scale, zero, axis_i=0)


# What onnxruntime needs from the step: its own dequantize op, depthwise kernels dequantized from
# constants alone (it folds them to fp32 at load; its fast depthwise kernels need constant weights), and the data dependencies that pin its scheduler (frozen
# weights dequantized at their use, masks made in the forward).
LOWERING = dataclasses.replace(PINNED, dequantize=_DequantizeLinear.apply, foldable_depthwise=True)


def onnx_names(prepared, optimizer) -> tuple[list[str], list[str]]:
    """Graph input names for trainable tensors and optimizer state (the spec's; ONNX-safe, stable)."""
    params = [param_name(i) for i in range(len(prepared.trainable))]
    state = [state_name(i) for i in range(len(optimizer.state_names(prepared.trainable)))]
    return params, state


def _export(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path,
            dynamic: dict | None = None) -> None:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: shapes are static by design
        torch.onnx.export(module, args, buf, input_names=inputs, output_names=outputs, opset_version=OPSET,
                          do_constant_folding=False, dynamo=False, dynamic_axes=dynamic)
    model = onnx.load_from_string(buf.getvalue())
    fuse_pad_into_conv(model)
    crop_into_conv_transpose(model)
    rank_match_scalars(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def export_onnx(prepared, optimizer, batch_size: int, out: Path, weight_block_bytes: int | None = None) -> dict:
    lowering = dataclasses.replace(LOWERING, weight_block_bytes=weight_block_bytes)
    params = prepared.initial_params()
    state = optimizer.init_state(params)
    pnames, snames = onnx_names(prepared, optimizer)
    x = torch.zeros(batch_size, *prepared.graph.input_shape)
    y = torch.zeros(batch_size, dtype=torch.int64)
    lr = torch.tensor(optimizer.lr, dtype=torch.float32)
    flat = [params[t] for t in prepared.trainable] + [state[k] for k in optimizer.state_names(prepared.trainable)]
    train, ev = ONNX.program("train_step"), ONNX.program("eval")
    step = LeanStep(prepared, optimizer, lowering).eval()
    _export(step, (x, y, lr, *flat), train.input_names(pnames, snames), train.output_names(pnames, snames),
            out / train.file)
    _export(LeanEval(prepared, lowering).eval(), (x, *flat[: len(pnames)]), ev.input_names(pnames, snames),
            ev.output_names(pnames, snames), out / ev.file, dynamic={X: {0: "batch"}, LOGITS: {0: "batch"}})
    res: dict = {}
    merged = merged_model(prepared)
    if merged is not None:  # LoRA: the inference program takes the merged weights as inputs (see lora.py)
        inputs = dict(zip(prepared.trainable, pnames))
        mp = merged.initial_params()
        _export(LeanEval(merged, lowering).eval(), (x, *(mp[t] for t in merged.trainable)),
                [X, *(inputs.get(t, t) for t in merged.trainable)], [LOGITS], out / "inference.onnx",
                dynamic={X: {0: "batch"}, LOGITS: {0: "batch"}})
        res["programs"] = {"inference": "inference.onnx"}
        res["extra"] = {"lora": write_lora_file(prepared, out, "inference")}
        res["files"] = [LORA_FILE]
    return res
