"""The few facts the runtime checks in an ONNX file before onnxruntime opens it, read straight
from the protobuf wire format (the device runtime does not need the `onnx` package):

- every tensor's data location: a tensor kept in an external file (TensorProto.data_location
  EXTERNAL or any `external_data` entry) is reported, wherever it is (initializers, sparse
  initializers, node attributes, subgraphs, functions, training info), so that it can be refused;
- the main graph's inputs and outputs: name, element type and shape (an int per fixed dimension,
  None per symbolic one).

Field numbers are those of onnx.proto (ONNX 1.17)."""
from __future__ import annotations

from dataclasses import dataclass

MAX_DEPTH = 64  # nested graphs (If/Loop bodies) deeper than this are refused, not recursed into

# message -> {field number: message of that field}, for the fields that can hold tensors
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _TENSOR: {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class ValueInfo:
    name: str
    elem_type: int  # TensorProto.DataType: 1 float, 7 int64, 0 when not a tensor
    shape: tuple | None  # None: rank unknown; else an int per fixed dimension, None per symbolic one


@dataclass(frozen=True)
class OnnxSummary:
    external: tuple[str, ...]  # names of tensors whose data lives outside the file
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    initializers: frozenset[str]


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def fields(buf: memoryview):
    """(field number, wire type, value) of each field of one message: an int for varints and
    fixed-width values, a memoryview for length-delimited ones."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ProtoError("field number 0")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if i + width > n:
                raise ProtoError("truncated fixed-width field")
            value, i = int.from_bytes(buf[i : i + width], "little"), i + width
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise ProtoError("length-delimited field runs past the end")
            value, i = buf[i : i + length], i + length
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise ProtoError(f"unsupported wire type {wire}")
        yield num, wire, value


def _text(v) -> str:
    return bytes(v).decode("utf-8", "replace") if isinstance(v, memoryview) else ""


def _external_tensors(buf: memoryview, kind: int, depth: int, found: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise ProtoError(f"graphs nested deeper than {MAX_DEPTH}")
    children = _CHILDREN[kind]
    if kind == _TENSOR:
        name, external = "", False
        for num, wire, value in fields(buf):
            if num == _TENSOR_NAME and wire == 2:
                name = _text(value)
            elif num == _TENSOR_EXTERNAL_DATA:
                external = True
            elif num == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                external = True
        if external:
            found.append(name or "<unnamed>")
        return
    for num, wire, value in fields(buf):
        child = children.get(num)
        if child is not None:
            if wire != 2:
                raise ProtoError(f"field {num} should be a message")
            _external_tensors(value, child, depth + 1, found)


def _shape(buf: memoryview) -> tuple:
    dims = []
    for num, wire, dim in fields(buf):
        if num == 1 and wire == 2:  # TensorShapeProto.dim
            value = None
            for n, w, v in fields(dim):
                if n == 1 and w == 0:  # dim_value
                    value = v if v < 1 << 63 else v - (1 << 64)
            dims.append(value)
    return tuple(dims)


def _value_info(buf: memoryview) -> ValueInfo:
    name, elem, shape = "", 0, None
    for num, wire, value in fields(buf):
        if num == 1 and wire == 2:
            name = _text(value)
        elif num == 2 and wire == 2:  # TypeProto
            for n, w, tensor in fields(value):
                if n == 1 and w == 2:  # tensor_type
                    for tn, tw, tv in fields(tensor):
                        if tn == 1 and tw == 0:
                            elem = tv
                        elif tn == 2 and tw == 2:
                            shape = _shape(tv)
    return ValueInfo(name, elem, shape)


def summarize(data: bytes) -> OnnxSummary:
    """External tensors and the main graph's inputs, outputs and initializer names of a
    serialized ModelProto; ProtoError if the bytes are not one."""
    buf = memoryview(data)
    external: list[str] = []
    try:
        _external_tensors(buf, _MODEL, 0, external)
        inputs, outputs, inits = [], [], set()
        for num, wire, graph in fields(buf):
            if num == 7 and wire == 2:
                for n, w, v in fields(graph):
                    if n == 11 and w == 2:
                        inputs.append(_value_info(v))
                    elif n == 12 and w == 2:
                        outputs.append(_value_info(v))
                    elif n == 5 and w == 2:
                        inits.update(_text(tv) for tn, tw, tv in fields(v) if tn == _TENSOR_NAME and tw == 2)
    except RecursionError:
        raise ProtoError("messages nested too deeply") from None
    return OnnxSummary(tuple(external), tuple(inputs), tuple(outputs), frozenset(inits))
