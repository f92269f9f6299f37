"""A bundle's initial state: the trainable parameters and optimizer state, by manifest name. A
safetensors file (BUNDLE.md); bundles exported before it hold an npz, still read.
Every declared dtype and shape is checked against the manifest before any array is made; only
finite floats pass; nothing is unpickled."""
from __future__ import annotations

import io
import math

import numpy as np

from . import safetensors
from .errors import BundleError
from .npz import NpzError, inspect
from .targets import CONTRACT

FORMAT: str = CONTRACT["state"]["format"]
VERSION: int = CONTRACT["state"]["version"]
FILE: str = CONTRACT["state"]["file"]


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """The safetensors bytes of a bundle's initial state (`arrays` by their state key)."""
    return safetensors.encode({k: np.asarray(v, np.float32) for k, v in arrays.items()},
                              {"format": FORMAT, "version": str(VERSION)})


def _check(name: str, dtype: str, is_float: bool, shape: tuple, expected: tuple) -> None:
    if not is_float or tuple(shape) != expected:
        raise BundleError(f"initial state '{name}' is {dtype}{list(shape)}, the manifest says float32{list(expected)}")


def read(data: bytes, file: str, keys: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The arrays (by manifest name) of the state file `file`'s bytes `data`, where `keys` maps
    manifest names to the file's tensor names and `shapes` gives the manifest's shapes."""
    arrays = _read_npz(data, file, keys, shapes) if data[:2] == b"PK" else _read_safetensors(data, file, keys, shapes)
    state = {}
    for name, shape in shapes.items():
        a = arrays[keys[name]]
        _check(name, str(a.dtype), a.dtype.kind == "f", a.shape, shape)
        if not np.isfinite(a).all():
            raise BundleError(f"initial state '{name}' holds NaN or Inf values")
        state[name] = a
    return state


def _read_safetensors(data, file, keys, shapes) -> dict[str, np.ndarray]:
    try:
        entries, _, start = safetensors.read_header(data)
    except safetensors.SafetensorsError as e:
        raise BundleError(f"cannot read initial state '{file}': it {e}") from None
    found = {e.name: e for e in entries}
    missing = [keys[n] for n in shapes if keys[n] not in found]
    if missing:
        raise BundleError(f"initial state lacks arrays {missing[:3]}")
    for name, shape in shapes.items():
        e = found[keys[name]]
        _check(name, e.dtype, e.dtype.startswith("F"), e.shape, shape)
    return {keys[n]: safetensors.tensor(data, start, found[keys[n]]) for n in shapes}


def _read_npz(data, file, keys, shapes) -> dict[str, np.ndarray]:
    buf = io.BytesIO(data)
    # the headers first: each array must be declared as the manifest says before any is inflated
    expected = sum(math.prod(s) * 16 for s in shapes.values()) + 4096 * (len(shapes) + 1)
    try:
        members = inspect(buf, max_bytes=expected)
    except NpzError as e:
        raise BundleError(f"cannot read initial state '{file}': it {e}") from None
    pickled = [k for k, m in members.items() if m.dtype.hasobject]
    if pickled:
        raise BundleError(f"cannot read initial state '{file}': it holds pickled objects ('{pickled[0]}'), "
                          "which are refused")
    for name, shape in shapes.items():
        m = members.get(keys[name])
        if m is None:
            raise BundleError(f"initial state lacks arrays {[keys[name]]}")
        _check(name, str(m.dtype), m.dtype.kind == "f", m.shape, shape)
    try:
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # numpy raises several types for corrupt archives and refused pickles
        why = "it holds pickled objects, which are refused" if "pickle" in str(e) else type(e).__name__
        raise BundleError(f"cannot read initial state '{file}': {why}") from None
    missing = [keys[n] for n in shapes if keys[n] not in arrays]
    if missing:
        raise BundleError(f"initial state lacks arrays {missing[:3]}")
    return arrays
