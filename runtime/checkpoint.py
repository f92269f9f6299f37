"""Crash-safe checkpoints: one npz (no pickles) with the parameters, optimizer state and a JSON
header carrying the step count, schedule and a sha256 over the arrays *and* the header's other
fields. Written to a temporary file in the same directory, fsynced, renamed over the old one and
the directory fsynced, so a crash (or a full disk) at any moment leaves the previous checkpoint
intact; a torn or altered file fails its checksum on load."""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# 2: the checksum covers the header's metadata too (1 covered the arrays only).
VERSION = 2
HEADER = "__header__"
SCHEDULES = ("constant", "cosine")
MAX_HEADER_CHARS = 1 << 20


def _digest(arrays: dict[str, np.ndarray], meta: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _tmp_prefix(path: Path) -> str:
    return path.name + "."


def _remove_stale_temps(path: Path) -> None:
    """Temporary files a killed writer left beside `path` (best effort)."""
    try:
        for p in path.parent.glob(glob.escape(_tmp_prefix(path)) + "*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass
    except OSError:
        pass


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically replace `path` with a checkpoint of `arrays` and `meta` (a JSON-able dict).
    Raises CheckpointError (the previous checkpoint intact) when it cannot be written."""
    path = Path(path)
    keys = {name: f"a{i}" for i, name in enumerate(arrays)}
    arrays = {n: np.asarray(v) for n, v in arrays.items()}
    meta = {**meta, "keys": keys}
    header = {"version": VERSION, **meta, "sha256": _digest(arrays, meta)}
    buf = io.BytesIO()
    np.savez(buf, **{HEADER: np.array(json.dumps(header))}, **{keys[n]: v for n, v in arrays.items()})
    data = buf.getvalue()
    directory = path.parent
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=directory)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise CheckpointError(f"cannot write checkpoint '{path}': {getattr(e, 'strerror', None) or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint '{path}': {e.strerror or e}; "
                              f"the previous checkpoint is intact") from None
    # The rename is done; make it durable. Some file systems refuse fsync on a directory: the
    # new checkpoint is in place either way, so this is best effort.
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    _remove_stale_temps(path)
    return path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(path: Path, h: dict) -> None:
    """The trainer's fields, so that a checkpoint that passes here can be resumed from."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"checkpoint '{path}' has an invalid header: {what}")

    need(_is_int(h.get("step")) and h["step"] >= 0, "'step' must be a non-negative integer")
    need(_is_int(h.get("epoch")) and h["epoch"] >= 0, "'epoch' must be a non-negative integer")
    s = h.get("schedule")
    need(isinstance(s, dict), "'schedule' must be an object")
    need(s.get("name") in SCHEDULES, f"'schedule.name' must be one of {', '.join(SCHEDULES)}")
    lr = s.get("lr")
    need(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0,
         "'schedule.lr' must be a positive number")
    need(_is_int(s.get("total_steps")) and s["total_steps"] >= 0,
         "'schedule.total_steps' must be a non-negative integer")
    need("start_step" not in s or (_is_int(s["start_step"]) and 0 <= s["start_step"] <= h["step"]),
         "'schedule.start_step' must be an integer between 0 and 'step'")
    need(isinstance(h.get("bundle"), dict), "'bundle' must be an object")


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays by name, header) of a checkpoint written by save_checkpoint, verified against its
    checksum. Raises CheckpointError for anything else (never unpickles)."""
    path = Path(path)
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise CheckpointError(f"checkpoint '{path}' {what}")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e.strerror or e}") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except Exception as e:  # zip and npy parsers raise many types on corrupt input; pickles are refused
        why = "holds pickled objects, which are refused" if "pickle" in str(e) else f"is corrupt ({type(e).__name__})"
        raise CheckpointError(f"checkpoint '{path}' {why}, or is not an edgetl checkpoint") from None
    raw = files.pop(HEADER, None)
    if raw is None or raw.dtype.kind != "U" or raw.shape != () or len(str(raw)) > MAX_HEADER_CHARS:
        raise CheckpointError(f"checkpoint '{path}' is not an edgetl checkpoint (no header)")
    try:
        header = json.loads(str(raw))
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint '{path}' has a corrupt header") from None
    if not isinstance(header, dict) or header.get("version") != VERSION or not _is_int(header.get("version")):
        version = header.get("version") if isinstance(header, dict) else None
        raise CheckpointError(f"checkpoint '{path}' has format version {version!r}; this runtime reads "
                              f"version {VERSION}")
    keys = header.get("keys")
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise CheckpointError(f"checkpoint '{path}' has an invalid header: 'keys' must map names to arrays")
    missing = [k for k in keys.values() if k not in files]
    if missing or len(set(keys.values())) != len(keys) or set(files) - set(keys.values()):
        raise CheckpointError(f"checkpoint '{path}' does not hold exactly the arrays its header names")
    arrays = {name: files[key] for name, key in keys.items()}
    meta = {k: v for k, v in header.items() if k not in ("version", "sha256")}
    if _digest(arrays, meta) != header.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' fails its checksum (corrupt or altered)")
    _check_meta(path, header)
    for name, a in arrays.items():
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint '{path}': '{name}' is not a finite float array")
    return arrays, header
