"""Crash-safe checkpoints: one npz (no pickles) with the parameters, optimizer state and a JSON
header carrying the step count, schedule and a sha256 of the arrays. Written to a temporary
file, fsynced and renamed, so a crash leaves the previous checkpoint intact."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import CheckpointError

VERSION = 1


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    path = Path(path)
    keys = {name: f"a{i}" for i, name in enumerate(arrays)}
    header = {"version": VERSION, "keys": keys, "sha256": _digest(arrays), **meta}
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array(json.dumps(header)), **{keys[n]: np.asarray(v) for n, v in arrays.items()})
    data = buf.getvalue()
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint in '{directory}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint '{path}': {e.strerror or e}; the previous one is intact") from None
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        header = json.loads(str(files.pop("__header__")))
    except Exception as e:  # zip, npy and json parsers raise many types on corrupt input
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not an edgetl checkpoint ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("version") != VERSION or not isinstance(header.get("keys"), dict):
        raise CheckpointError(f"checkpoint '{path}' has an unknown format version")
    try:
        arrays = {name: files[key] for name, key in header["keys"].items()}
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{path}' lacks arrays its header names") from None
    if _digest(arrays) != header.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' fails its checksum (corrupt or altered)")
    return arrays, header
