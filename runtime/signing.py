"""Signed bundles: Ed25519 over the exact bytes of manifest.json (which holds every other file's
sha256), so that a bundle can be checked as authentic, not only intact.

Keys (from `edgetl keygen`): the private key is PEM PKCS#8, mode 0600, for the host that exports;
the public key (`*.pub`) is PEM SubjectPublicKeyInfo, for the device. The signature file,
`manifest.sig` in the bundle, is JSON:

    {"format": "edgetl-signature", "format_version": 1, "algorithm": "ed25519",
     "signed_file": "manifest.json", "key_id": "<first 16 hex of sha256(raw public key)>",
     "signature": "<base64 of the 64-byte Ed25519 signature of manifest.json's bytes>"}

A runtime given a trusted key (argument, or the file named by $EDGETL_TRUSTED_KEY) refuses a
bundle without a signature, signed by another key, or whose manifest changed after signing.
The device verifies with edgetl's own pure-Python Ed25519 (ed25519.py); only the host's key
generation and signing use `cryptography` (the `host` extra)."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import ed25519
from .errors import BundleError, EdgeRuntimeError
from .targets import CONTRACT

SIGNATURE: str = CONTRACT["signature"]["file"]
SIGNED_FILE: str = CONTRACT["signature"]["signed_file"]
FORMAT: str = CONTRACT["signature"]["format"]
FORMAT_VERSION: int = CONTRACT["signature"]["format_version"]
TRUSTED_KEY_ENV = "EDGETL_TRUSTED_KEY"
MAX_KEY_BYTES = 16 << 10
MAX_SIGNATURE_BYTES = 4 << 10


class SigningKeyError(EdgeRuntimeError):
    """A signing or trusted key file is missing, unreadable or not an Ed25519 key."""


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key, as its raw 32 bytes (RFC 8032 encoding)."""
    raw: bytes


def _crypto():
    """The host's key generation and signing only."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519
    except ImportError:
        raise SigningKeyError("making keys and signing bundles needs the 'cryptography' package "
                              "(pip install 'edgetl[host]')") from None
    return serialization, crypto_ed25519


def _read_key_file(path, what: str) -> bytes:
    p = Path(path)
    try:
        if not p.is_file():
            raise SigningKeyError(f"{what} '{p}' does not exist or is not a file")
        if p.stat().st_size > MAX_KEY_BYTES:
            raise SigningKeyError(f"{what} '{p}' is too large to be an Ed25519 key")
        return p.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read {what} '{p}': {e.strerror or type(e).__name__}") from None


def public_raw(public_key) -> bytes:
    """The raw 32 bytes of a PublicKey or of a `cryptography` Ed25519PublicKey."""
    if isinstance(public_key, PublicKey):
        return public_key.raw
    return public_key.public_bytes_raw()


def key_id(public_key) -> str:
    return hashlib.sha256(public_raw(public_key)).hexdigest()[:16]


def generate_keypair(out_dir, name: str = "edgetl-signing") -> tuple[Path, Path]:
    """Write `out_dir/name.key` (private, mode 0600) and `out_dir/name.pub`; never overwrites."""
    serialization, crypto_ed25519 = _crypto()
    out = Path(out_dir)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
        raise SigningKeyError(f"key name {name!r} must be a plain file name (no directories); give the "
                              "directory with --out")
    if out.exists() and not out.is_dir():
        raise SigningKeyError(f"'{out}' exists and is not a directory")
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise SigningKeyError(f"'{p}' already exists; refusing to overwrite a key")
    key = crypto_ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never follow a planted symlink or replace a file; 0600 from the first byte
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv)
        os.chmod(priv_path, 0o600)  # in case the umask is unusual
        fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pub)
    except OSError as e:
        raise SigningKeyError(f"cannot write the key pair in '{out}': {e.strerror or type(e).__name__}") from None
    return priv_path, pub_path


def load_private_key(path):
    serialization, crypto_ed25519 = _crypto()
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError (a password-protected key), UnsupportedAlgorithm
        raise SigningKeyError(f"signing key '{path}' is not an unencrypted PEM private key "
                              "(the *.key of `edgetl keygen`)") from None
    if not isinstance(key, crypto_ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"signing key '{path}' is not an Ed25519 key (make one with `edgetl keygen`)")
    return key


def load_public_key(path) -> PublicKey:
    data = _read_key_file(path, "trusted key")
    der = ed25519.pem_to_der(data)
    if der is None:
        raise SigningKeyError(f"trusted key '{path}' is not a PEM public key (the *.pub of `edgetl keygen`)")
    return _trusted(ed25519.raw_from_spki(der), f"trusted key '{path}'")


def _trusted(raw: bytes | None, what: str) -> PublicKey:
    if raw is None or ed25519.decode_point(raw) is None:
        raise SigningKeyError(f"{what} is not an Ed25519 public key (make one with `edgetl keygen`)")
    if ed25519.is_small_order(raw):  # such a key accepts signatures anyone can make
        raise SigningKeyError(f"{what} is a weak Ed25519 key of small order (make one with `edgetl keygen`)")
    return PublicKey(raw)


def resolve_trusted_key(trusted_key=None) -> PublicKey | None:
    """The public key to check bundles with: `trusted_key` (a path, a PublicKey, or a `cryptography`
    Ed25519PublicKey), else the file named by $EDGETL_TRUSTED_KEY, else None (bundles are checked
    for integrity only)."""
    if trusted_key is None:
        trusted_key = os.environ.get(TRUSTED_KEY_ENV) or None
        if trusted_key is None:
            return None
    if isinstance(trusted_key, (str, os.PathLike)):
        return load_public_key(trusted_key)
    if isinstance(trusted_key, PublicKey):
        return trusted_key
    if type(trusted_key).__name__ == "Ed25519PublicKey":  # duck-typed: no `cryptography` import on the device
        return _trusted(trusted_key.public_bytes_raw(), "trusted_key")
    raise SigningKeyError(f"trusted_key must be a path to a *.pub file, got {type(trusted_key).__name__}")


def sign(private_key, manifest_bytes: bytes) -> bytes:
    """The contents of `manifest.sig` for these manifest bytes."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "algorithm": "ed25519", "signed_file": SIGNED_FILE,
           "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")}
    return (json.dumps(doc, indent=2) + "\n").encode()


def verify(manifest_bytes: bytes, signature_bytes: bytes | None, public_key) -> None:
    """BundleError unless `signature_bytes` is a valid signature of `manifest_bytes` by `public_key`."""
    if signature_bytes is None:
        raise BundleError(f"the bundle is not signed (no {SIGNATURE}) and a trusted key is configured; "
                          "export it with --sign-key")
    try:
        doc = json.loads(signature_bytes.decode("utf-8"))
        ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("format_version") == FORMAT_VERSION
              and doc.get("algorithm") == "ed25519" and doc.get("signed_file") == SIGNED_FILE
              and isinstance(doc.get("signature"), str))
        sig = base64.b64decode(doc["signature"], validate=True) if ok else b""
    except (UnicodeDecodeError, ValueError, binascii.Error, RecursionError):
        ok, sig = False, b""
    if not ok or len(sig) != 64:
        raise BundleError(f"{SIGNATURE} is not a valid edgetl signature file")
    trusted = key_id(public_key)
    if doc.get("key_id") != trusted:
        raise BundleError(f"the bundle is signed by another key (key id {str(doc.get('key_id'))[:16]!r}), "
                          f"not the trusted key ({trusted})")
    if not ed25519.verify(public_raw(public_key), manifest_bytes, sig):
        raise BundleError(f"the bundle's signature does not match its {SIGNED_FILE}: "
                          "the manifest was altered after signing")


def read_signature(root: Path) -> bytes | None:
    """The bundle's signature file, or None if there is none."""
    from .bundle import safe_path

    p = safe_path(root, SIGNATURE)
    try:
        if not p.exists():
            return None
        if not p.is_file() or p.stat().st_size > MAX_SIGNATURE_BYTES:
            raise BundleError(f"{SIGNATURE} is not a valid edgetl signature file")
        return p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {SIGNATURE}: {e.strerror or type(e).__name__}") from None
