"""Ed25519 signature verification in pure Python (stdlib only), from RFC 8032: point decoding per
section 5.1.3, verification per section 5.1.7, so that the device checks signed bundles without the
`cryptography` package. Verification handles no secret, so it need not run in constant time.

The check is the cofactorless equation [S]B = R + [k]A, as OpenSSL (and so `cryptography`) uses;
the RFC allows it or the cofactored [8][S]B = [8]R + [8][k]A, and the two disagree only on crafted
signatures involving small-order components, where matching OpenSSL keeps the host and the device
agreeing. Unlike OpenSSL, A (and R) must be canonical encodings, as section 5.1.3 requires: y < p,
and not x = 0 with the sign bit set. Both differences only touch keys no key generator produces."""
from __future__ import annotations

import base64
import binascii
import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point B
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # DER SubjectPublicKeyInfo of an Ed25519 key
PEM_BEGIN, PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"

Point = tuple[int, int, int, int]  # extended homogeneous coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z
IDENTITY: Point = (0, 1, 1, 0)


def _add(p: Point, q: Point) -> Point:
    """RFC 8032 section 5.1.4; complete, so it doubles too."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _mul(s: int, p: Point) -> Point:
    q = IDENTITY
    while s:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _same(p: Point, q: Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % P == 0 and (p[1] * q[2] - q[1] * p[2]) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    """Section 5.1.3 steps 1-4: x from y and x's sign bit, or None where the RFC says decoding fails."""
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if (v * x * x - u) % P:
        x = x * SQRT_M1 % P
        if (v * x * x - u) % P:
            return None  # no square root: not a point of the curve
    if x == 0 and sign:
        return None
    return P - x if x & 1 != sign else x


def decode_point(b: bytes) -> Point | None:
    if len(b) != 32:
        return None
    n = int.from_bytes(b, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


_BY = 4 * pow(5, P - 2, P) % P
BASE: Point = (_recover_x(_BY, 0), _BY, 1, _recover_x(_BY, 0) * _BY % P)


def is_small_order(public: bytes) -> bool:
    """Whether the point encoded by `public` has order dividing 8 (anyone can sign for such a key)."""
    a = decode_point(public)
    return a is not None and _same(_mul(8, a), IDENTITY)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `message` by the raw 32-byte key `public`."""
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = decode_point(public), decode_point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % L
    return _same(_mul(s, BASE), _add(r, _mul(k, a)))


def pem_to_der(data: bytes) -> bytes | None:
    """The DER inside a PEM "PUBLIC KEY" block, or None if `data` is not one."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    begin, end = text.find(PEM_BEGIN), text.find(PEM_END)
    if begin < 0 or end < begin:
        return None
    body = "".join(text[begin + len(PEM_BEGIN):end].split())
    try:
        return base64.b64decode(body, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def raw_from_spki(der: bytes) -> bytes | None:
    """The raw 32-byte key of an Ed25519 SubjectPublicKeyInfo (as `edgetl keygen` writes), or None."""
    if len(der) != len(SPKI_PREFIX) + 32 or not der.startswith(SPKI_PREFIX):
        return None
    return der[len(SPKI_PREFIX):]
