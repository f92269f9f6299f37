"""Writing state and checkpoint files the way other (earlier or hostile) writers do, for tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgetl.runtime import checkpoint as ckpt
from edgetl.runtime import safetensors as st
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256


def savez(path, **arrays) -> None:
    """np.savez to exactly `path` (np.savez appends .npz to a name without it)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_v3(path, arrays: dict, meta: dict, header_changes: dict | None = None) -> None:
    """A checkpoint as the runtime wrote it before version 4: an npz of `a0`, `a1`, ... and a
    JSON `__header__` (with `header_changes` applied after its checksum was computed)."""
    keys = {n: f"a{i}" for i, n in enumerate(arrays)}
    meta = {**meta, "keys": keys}
    header = {"version": 3, **meta, "sha256": ckpt._digest(arrays, meta), **(header_changes or {})}
    savez(path, __header__=np.array(json.dumps(header)), **{keys[n]: v for n, v in arrays.items()})


def v3_of(path, out) -> None:
    """The version 4 checkpoint at `path` written again as version 3 to `out`."""
    arrays, header = ckpt.load_checkpoint(path)
    write_v3(out, arrays, {k: v for k, v in header.items() if k not in ("format", "version", "sha256")})


def rewrite(path, arrays: dict, metadata: dict, fix_digest: bool = True) -> None:
    """A version 4 checkpoint of `arrays` and `metadata` (strings), its checksum recomputed unless not."""
    data = st.encode(arrays, metadata)
    if fix_digest:
        entries, _, start = st.read_header(data)
        data = st.encode(arrays, {**metadata, "sha256": ckpt.digest(metadata, entries, data[start:])})
    Path(path).write_bytes(data)


def as_npz_state(b: Path) -> Path:
    """Turn bundle `b`'s state into an npz, as bundles were exported before safetensors (the
    manifest resealed); returns the npz's path."""
    m = json.loads((b / "manifest.json").read_text())
    arrays, _ = st.decode((b / m["state_file"]).read_bytes())
    keys = {n: f"a{i}" for i, n in enumerate(m["state_keys"])}
    savez(b / "state.npz", **{keys[n]: arrays[k] for n, k in m["state_keys"].items()})
    (b / m["state_file"]).unlink()
    del m["files"][m["state_file"]]
    m["state_file"], m["state_keys"], m["files"]["state.npz"] = "state.npz", keys, sha256(b / "state.npz")
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (b / "manifest.json").write_text(json.dumps(m))
    return b / "state.npz"
