"""edgetl's own Ed25519 verifier (runtime/ed25519.py), with which a device checks signed bundles
without `cryptography`: it accepts RFC 8032's test vectors, agrees with `cryptography` (OpenSSL)
on valid and tampered signatures, and refuses what RFC 8032 says to refuse (S >= L, non-canonical
or off-curve points). The trusted key is read from the PEM that `edgetl keygen` writes; other
keys, and keys of small order (for which anyone can make a valid signature), are refused."""
import base64
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto, x25519

from edgetl.runtime import ed25519
from edgetl.runtime.signing import SigningKeyError, load_public_key

# RFC 8032 section 7.1: (secret key, public key, message, signature)
RFC8032 = {
    "TEST 1": ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
               "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
               "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
               "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    "TEST 2": ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
               "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
               "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
               "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    "TEST 3": ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
               "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
               "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
               "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
}
P, L = ed25519.P, ed25519.L
IDENTITY = (1).to_bytes(32, "little")  # y = 1, x = 0: the neutral point, of order 1


def _crypto_accepts(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        crypto.Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _encode(point) -> bytes:
    x, y, z, _ = point
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("name", RFC8032)
def test_rfc8032_vectors_verify(name):
    secret, public, message, signature = (bytes.fromhex(h) for h in RFC8032[name])
    # the vectors as typed here are RFC 8032's: cryptography derives the same key and signature
    key = crypto.Ed25519PrivateKey.from_private_bytes(secret)
    assert key.public_key().public_bytes_raw() == public and key.sign(message) == signature
    assert ed25519.verify(public, message, signature)
    assert not ed25519.verify(public, message + b"\x00", signature)
    assert not ed25519.verify(public, message, _flip(signature, 0))


def test_agrees_with_cryptography_on_random_keys_and_messages():
    rng = random.Random(8032)
    for i in range(12):
        key, other = crypto.Ed25519PrivateKey.generate(), crypto.Ed25519PrivateKey.generate()
        public, other_public = key.public_key().public_bytes_raw(), other.public_key().public_bytes_raw()
        message = rng.randbytes(rng.choice([0, 1, 31, 64, 1000]))
        signature = key.sign(message)
        cases = [(public, message, signature, True), (other_public, message, signature, False),
                 (public, message + b"!", signature, False),
                 (public, _flip(message, rng.randrange(8 * len(message))) if message else b"x", signature, False),
                 (public, message, _flip(signature, rng.randrange(256)), False),  # in R
                 (public, message, _flip(signature, 256 + rng.randrange(256)), False),  # in S
                 (_flip(public, rng.randrange(255)), message, signature, False)]
        for pub, msg, sig, valid in cases:
            assert ed25519.verify(pub, msg, sig) is valid, (i, pub.hex(), msg.hex(), sig.hex())
            assert _crypto_accepts(pub, msg, sig) is valid


def test_s_at_or_above_the_group_order_is_refused():
    key = crypto.Ed25519PrivateKey.generate()
    public, message = key.public_key().public_bytes_raw(), b"manifest"
    signature = key.sign(message)
    s = int.from_bytes(signature[32:], "little")
    # [S + L]B = [S]B: the equation alone still holds; RFC 8032 (and OpenSSL) refuse S >= L
    for bad in (s + L, L, 2**256 - 1):
        forged = signature[:32] + bad.to_bytes(32, "little")
        assert not ed25519.verify(public, message, forged)
        assert not _crypto_accepts(public, message, forged)


def _off_curve_y() -> int:
    return next(y for y in range(2, 100) if ed25519.decode_point(y.to_bytes(32, "little")) is None
                and ed25519.decode_point((y | 1 << 255).to_bytes(32, "little")) is None)


def test_point_decoding_refuses_what_rfc8032_refuses():
    assert ed25519.decode_point(IDENTITY) is not None
    assert _encode(ed25519.decode_point(IDENTITY)) == IDENTITY
    assert _encode(ed25519.BASE) == bytes.fromhex("58" + "66" * 31)  # RFC 8032's encoding of B
    refused = {"y = p + 1 (the identity, non-canonical)": (P + 1).to_bytes(32, "little"),
               "y = p (0, non-canonical)": P.to_bytes(32, "little"),
               "x = 0 with the sign bit set": (1 | 1 << 255).to_bytes(32, "little"),
               "no square root (off the curve)": _off_curve_y().to_bytes(32, "little"),
               "31 bytes": IDENTITY[:31]}
    for why, b in refused.items():
        assert ed25519.decode_point(b) is None, why


def test_small_order_and_non_canonical_keys():
    """With A the identity, R = [r]B and S = r satisfy [S]B = R + [k]A for every message. The
    cofactorless check accepts that, as OpenSSL does, so the verifiers agree; the device instead
    refuses such a trusted key when it reads it (test_weak_and_foreign_keys_are_refused). The
    identity's non-canonical encodings, which OpenSSL (ref10 decoding) accepts, edgetl refuses, as
    RFC 8032 section 5.1.3 requires: the one place the verifiers differ, on keys no key generator
    makes."""
    r = 123456789
    forged = _encode(ed25519._mul(r, ed25519.BASE)) + r.to_bytes(32, "little")
    for message in (b"", b"any manifest at all"):
        assert ed25519.verify(IDENTITY, message, forged) and _crypto_accepts(IDENTITY, message, forged)
    assert ed25519.is_small_order(IDENTITY)
    non_canonical = [(P + 1).to_bytes(32, "little"), (1 | 1 << 255).to_bytes(32, "little")]
    for public in non_canonical:
        assert not ed25519.verify(public, b"m", forged) and _crypto_accepts(public, b"m", forged)
    # R encoded non-canonically is refused by both (OpenSSL compares R's bytes with a canonical encoding)
    r_bad = (P + 1).to_bytes(32, "little") + bytes(32)  # R = identity (non-canonical), S = 0
    assert not ed25519.verify(IDENTITY, b"m", r_bad) and not _crypto_accepts(IDENTITY, b"m", r_bad)
    assert ed25519.verify(IDENTITY, b"m", IDENTITY + bytes(32)) and _crypto_accepts(IDENTITY, b"m", IDENTITY + bytes(32))


def _pem(raw: bytes) -> bytes:
    return crypto.Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_reads_the_public_key_pem_of_keygen(tmp_path):
    key = crypto.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes_raw()
    (tmp_path / "k.pub").write_bytes(_pem(raw))
    assert load_public_key(tmp_path / "k.pub").raw == raw
    (tmp_path / "crlf.pub").write_bytes(_pem(raw).replace(b"\n", b"\r\n"))
    assert load_public_key(tmp_path / "crlf.pub").raw == raw


def test_weak_and_foreign_keys_are_refused(tmp_path):
    good = _pem(crypto.Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    body = b"".join(good.splitlines()[1:-1])
    der = base64.b64decode(body)
    x = x25519.X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cases = {"x25519.pub": (x, "not an ed25519 public key"),
             "long.pub": (b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der + b"\x00") +
                          b"\n-----END PUBLIC KEY-----\n", "not an ed25519 public key"),
             "small.pub": (_pem(IDENTITY), "small order"),
             "badb64.pub": (good.replace(body[:4], b"!!!!"), "not a pem public key"),
             "private.pem": (good.replace(b"PUBLIC", b"PRIVATE"), "not a pem public key"),
             "empty.pub": (b"", "not a pem public key")}
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SigningKeyError) as info:
            load_public_key(tmp_path / name)
        assert words in str(info.value).lower(), (name, str(info.value))
