"""Int8 storage of an ExecuTorch program's fp32 weight blobs, restored byte-exactly at load.

XNNPACK delegates a conv only when its weight is a constant of the program, so the frozen weights
sit in the .pte as fp32 (dequantized from int8 at export). They are dequantized int8 values, so
each blob is exactly q * scale per channel: the bundle stores q (int8) and the scales and the
device rebuilds the identical .pte bytes before loading it (checked by sha256). A blob that is
not exactly int8 per channel in any tried layout stays as it is.

File layout: MAGIC, u64 header length, JSON header {size, sha256, blobs: [[offset, nbytes,
outer, channels, inner]]}, then each blob's fp32 scales and int8 values, then the program's
other bytes in order."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from ..errors import EdgeRuntimeError

MAGIC = b"EDGETLQ8"
QMAX = 127


def is_packed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) == b.view(np.uint32)


def _fit(v3: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scales [C], q [outer, C, inner]) with q * scale == v3 bit for bit, or None."""
    mags = np.abs(v3).max(axis=(0, 2))
    scale = np.where(mags > 0, mags / np.float32(QMAX), np.float32(1.0)).astype(np.float32)
    todo = np.ones(len(scale), bool)
    best = scale.copy()
    q_out = np.zeros(v3.shape, np.int8)
    for nudge in (0, 1, -1, 2, -2):
        s = scale.copy()
        for _ in range(abs(nudge)):
            s = np.nextafter(s, np.float32(np.inf if nudge > 0 else 0), dtype=np.float32)
        s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(v3 / s[None, :, None]), -QMAX, QMAX)
        ok = _bits_equal((q.astype(np.float32) * s[None, :, None]).astype(np.float32), v3).all(axis=(0, 2))
        new = ok & todo
        best[new] = s[new]
        q_out[:, new, :] = q[:, new, :].astype(np.int8)
        todo &= ~ok
        if not todo.any():
            return best, q_out
    return None


def _encode_blob(raw: bytes, channels: set[int]) -> tuple[tuple[int, int, int], bytes] | None:
    if len(raw) % 4:
        return None
    v = np.frombuffer(raw, np.float32)
    if not np.isfinite(v).all():
        return None
    n = len(v)
    for c in sorted(channels, reverse=True):
        if c <= 0 or n % c or n // c < 4:
            continue
        for inner in dict.fromkeys((1, n // c, 4, 9, 16, 25, 49)):
            if (n // c) % inner:
                continue
            outer = n // c // inner
            fit = _fit(v.reshape(outer, c, inner))
            if fit is not None:
                scale, q = fit
                return (outer, c, inner), scale.tobytes() + q.tobytes()
    return None


def pack(program: bytes, blobs: list[bytes], channels: set[int]) -> bytes:
    """`program` with each of `blobs` (byte strings inside it, e.g. the delegate's constant
    weights) stored as int8 + per-channel scales where that is exact; the rest unchanged."""
    spans, payload = [], []
    taken: list[tuple[int, int]] = []
    for raw in sorted(set(blobs), key=len, reverse=True):
        if len(raw) < 256:
            continue
        at = program.find(raw)
        if at < 0 or any(at < e and s < at + len(raw) for s, e in taken):
            continue
        enc = _encode_blob(raw, channels)
        if enc is None:
            continue
        (outer, c, inner), data = enc
        spans.append([at, len(raw), outer, c, inner, data])
        taken.append((at, at + len(raw)))
    spans.sort(key=lambda s: s[0])
    rest, pos = [], 0
    for at, nbytes, *_ in spans:
        rest.append(program[pos:at])
        pos = at + nbytes
    rest.append(program[pos:])
    header = json.dumps({"size": len(program), "sha256": hashlib.sha256(program).hexdigest(),
                         "blobs": [s[:5] for s in spans]}).encode()
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *(s[5] for s in spans), *rest])


def _header(data: bytes) -> tuple[dict, int]:
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    return json.loads(data[start : start + hlen]), start + hlen


def unpacked_size(data: bytes) -> int:
    try:
        return int(_header(data)[0]["size"])
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise EdgeRuntimeError(f"the int8-packed ExecuTorch program is malformed ({e})") from None


def unpack(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """The original program bytes of a `pack`ed file (checked against its sha256), written into
    `out` (uint8, of `unpacked_size(data)`) when given, so that loading makes no extra copy."""
    try:
        header, pos = _header(data)
        if out is None:
            out = np.empty(int(header["size"]), np.uint8)
        if len(out) != int(header["size"]):
            raise ValueError("output size")
        src = np.frombuffer(data, np.uint8)
        dense = []
        for at, nbytes, outer, c, inner in header["blobs"]:
            scale = np.frombuffer(data, np.float32, c, pos)
            pos += 4 * c
            q = np.frombuffer(data, np.int8, outer * c * inner, pos).reshape(outer, c, inner)
            pos += q.size
            v = (q.astype(np.float32) * scale[None, :, None]).astype(np.float32)
            if v.nbytes != nbytes:
                raise ValueError("blob size")
            dense.append((at, v.view(np.uint8).reshape(-1)))
        w = 0
        for at, blob in dense:
            n = at - w
            out[w:at] = src[pos : pos + n]
            pos += n
            out[at : at + len(blob)] = blob
            w = at + len(blob)
        out[w:] = src[pos : pos + len(out) - w]
        pos += len(out) - w
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise EdgeRuntimeError(f"the int8-packed ExecuTorch program is malformed ({e})") from None
    if pos != len(data) or hashlib.sha256(out.data).hexdigest() != header["sha256"]:
        raise EdgeRuntimeError("the int8-packed ExecuTorch program does not restore to its recorded sha256")
    return out
