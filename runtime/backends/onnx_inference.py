"""A trained inference model from an eval program: parameter inputs become initializers and
the bundle's input normalisation is prepended, so the model takes images in [0, 1].

Written straight in the protobuf wire format (field numbers of onnx.proto), so that the light
device install needs no `onnx` package: the eval graph is copied field by field, with the
parameter inputs dropped, the two normalisation nodes put first, every node reading `x` made to
read the normalised input, and the parameters and mean/std appended as initializers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..onnx_proto import ProtoError, fields
from ..targets import X

_FLOAT = 1  # TensorProto.DataType FLOAT
_X, _NORMALIZED = X, "edgetl.x_normalized"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, value) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 1:
        return key + value.to_bytes(8, "little")
    if wire == 5:
        return key + value.to_bytes(4, "little")
    value = bytes(value)
    return key + _varint(len(value)) + value


def _text(value) -> str:
    return bytes(value).decode("utf-8")


def _tensor(name: str, value: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    a = np.ascontiguousarray(value, dtype="<f4")
    return (b"".join(_field(1, 0, d) for d in a.shape) + _field(2, 0, _FLOAT) + _field(8, 2, name.encode())
            + _field(9, 2, a.tobytes()))


def _node(op: str, inputs: list[str], outputs: list[str]) -> bytes:
    """NodeProto: input (1), output (2), op_type (4)."""
    return (b"".join(_field(1, 2, i.encode()) for i in inputs) + b"".join(_field(2, 2, o.encode()) for o in outputs)
            + _field(4, 2, op.encode()))


def _rename_x(node: memoryview) -> bytes:
    return b"".join(_field(n, w, _NORMALIZED.encode() if n == 1 and w == 2 and _text(v) == _X else v)
                    for n, w, v in fields(node))


def _value_info_name(info: memoryview) -> str:
    return next((_text(v) for n, w, v in fields(info) if n == 1 and w == 2), "")


def _graph(graph: memoryview, params: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray) -> bytes:
    out, first_node = [], True
    for num, wire, value in fields(graph):
        if num == 1 and wire == 2:  # node
            if first_node:
                out.append(_field(1, 2, _node("Sub", [_X, "edgetl.mean"], ["edgetl.x_centered"])))
                out.append(_field(1, 2, _node("Div", ["edgetl.x_centered", "edgetl.std"], [_NORMALIZED])))
                first_node = False
            out.append(_field(1, 2, _rename_x(value)))
        elif num == 11 and wire == 2 and _value_info_name(value) in params:  # input fed by a parameter
            continue
        else:
            out.append(_field(num, wire, value))
    inits = {**params, "edgetl.mean": mean, "edgetl.std": std}
    out.extend(_field(5, 2, _tensor(name, v)) for name, v in inits.items())
    return b"".join(out)


def write_inference_model(eval_program: bytes, params: dict[str, np.ndarray], manifest: dict, out: Path) -> Path:
    """`eval_program`: the checked bytes of the bundle's eval program (read from bytes, so no external
    data file is ever opened)."""
    pre = manifest["input"]["preprocess"]
    shape = manifest["input"]["shape"]
    per_channel = (1, shape[0], *(1 for _ in shape[1:]))  # broadcasts over (N, C, L) or (N, C, H, W)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(per_channel)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(per_channel)
    data = memoryview(bytes(eval_program))
    try:
        model = b"".join(_field(n, w, _graph(v, params, mean, std) if n == 7 and w == 2 else v)
                         for n, w, v in fields(data))
    except (ProtoError, UnicodeDecodeError) as e:
        raise BundleError(f"the bundle's eval program is not a readable ONNX model: {e}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model)
    os.replace(tmp, out)
    return out
