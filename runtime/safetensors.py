"""safetensors, read and written with numpy alone: an 8-byte little-endian header length N, N bytes
of JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
padded with spaces), then the tensors' raw little-endian bytes, back to back. Every declared size is
checked against the bytes actually there before anything is allocated, and nothing is unpickled
(the format has no way to hold code). See BUNDLE.md."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from .errors import EdgeRuntimeError

METADATA = "__metadata__"
MAX_HEADER_BYTES = 16 << 20
MAX_DIMS = 8
DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1", "I16": "<i2", "I32": "<i4",
          "I64": "<i8", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(EdgeRuntimeError):
    """Bytes are not a readable safetensors file. Messages are verb phrases ("is truncated") that
    leave the file's name to the caller."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # the safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int


def encode(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of `arrays` (in their order) with `metadata` (string values)."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata maps strings to strings")
        header[METADATA] = dict(metadata)
    blobs, offset = [], 0
    for name, a in arrays.items():
        if name == METADATA:
            raise ValueError(f"a tensor cannot be named {METADATA}")
        a = np.asarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _NAMES:
            raise TypeError(f"tensor '{name}' has dtype {a.dtype}, which safetensors does not hold")
        raw = np.ascontiguousarray(a, dtype=dt).tobytes()
        header[name] = {"dtype": _NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise SafetensorsError(f"names '{k[:80]}' twice in its header")
        d[k] = v
    return d


def read_header(data: bytes | memoryview) -> tuple[list[Entry], dict[str, str], int]:
    """(tensor entries in data order, metadata, where the data section starts) of safetensors
    bytes, checked: the header within the file, every entry's dtype, shape and offsets consistent,
    and the entries covering the data section exactly (no gaps, overlaps or trailing bytes)."""
    if len(data) < 8:
        raise SafetensorsError(f"is truncated ({len(data)} bytes; a safetensors file starts with an 8-byte header length)")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"declares a header of {n} bytes, more than the {MAX_HEADER_BYTES} allowed; "
                               "it is not a safetensors file")
    if 8 + n > len(data):
        raise SafetensorsError(f"declares a header of {n} bytes, beyond the file's {len(data)} bytes (truncated?)")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SafetensorsError("has a header that is not JSON; it is not a safetensors file") from None
    if not isinstance(header, dict):
        raise SafetensorsError("has a header that is not a JSON object")
    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"has '{METADATA}' that does not map names to strings")
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"has an invalid entry for tensor '{name[:80]}'")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"has tensor '{name[:80]}' of dtype {str(dtype)[:20]!r}, which this runtime does not read")
        ints = lambda v: all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)  # noqa: E731
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and ints(shape)):
            raise SafetensorsError(f"has tensor '{name[:80]}' of an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and ints(offsets) and offsets[0] <= offsets[1]):
            raise SafetensorsError(f"has tensor '{name[:80]}' with invalid data_offsets {str(offsets)[:80]}")
        if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:
            raise SafetensorsError(f"has tensor '{name[:80]}' whose data_offsets do not match its dtype and shape")
        entries.append(Entry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    start, size, at = 8 + n, len(data) - 8 - n, 0
    for e in entries:
        if e.begin != at:
            raise SafetensorsError(f"has tensor '{e.name[:80]}' that overlaps another or leaves a gap before it")
        at = e.end
    if at > size:
        raise SafetensorsError(f"declares {at} bytes of tensor data but holds {size} (truncated?)")
    if at != size:
        raise SafetensorsError(f"holds {size - at} bytes after its last tensor")
    return entries, metadata, start


def tensor(data: bytes | memoryview, start: int, e: Entry) -> np.ndarray:
    """Entry `e`'s array (a copy, in native byte order)."""
    a = np.frombuffer(data, dtype=DTYPES[e.dtype], count=math.prod(e.shape), offset=start + e.begin)
    return a.astype(a.dtype.newbyteorder("="), copy=True).reshape(e.shape)


def decode(data: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays by name in data order, metadata) of safetensors bytes."""
    entries, metadata, start = read_header(data)
    return {e.name: tensor(data, start, e) for e in entries}, metadata
