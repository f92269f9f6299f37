"""Writing a bundle: programs, initial state (safetensors), and a manifest with checksums."""
from __future__ import annotations

import json
import os
from pathlib import Path


from edgetl.runtime import signing
from edgetl.runtime import state as state_file
from edgetl.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST, manifest_digest, sha256


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bundle(out: Path, prepared, target: str, optimizer, batch_size: int, programs: dict[str, str],
                 extra: dict | None = None, extra_files: list[str] = (), signer=None) -> Path:
    """Complete a bundle in `out`, whose program files are already written. The manifest is
    written last, atomically, so a half-written bundle never looks valid; with `signer` (an
    Ed25519 private key) its signature, `manifest.sig`, is written just before it."""
    import edgetl

    params = prepared.initial_params()
    state = optimizer.init_state(params)
    # A runtime that keeps its own optimizer state (ONNX Runtime's training API) gets none from us.
    state_names = [] if (extra or {}).get("optimizer_state_in_runtime") else optimizer.state_names(prepared.trainable)
    arrays = {**{t: params[t] for t in prepared.trainable}, **{k: state[k] for k in state_names}}
    keys = {name: name for name in arrays}  # the state file's tensors are named as the manifest names them
    (out / state_file.FILE).write_bytes(state_file.encode({n: v.detach().cpu().numpy() for n, v in arrays.items()}))
    mem = prepared.memory(batch_size, optimizer)
    rels = list(programs.values()) + [state_file.FILE, *extra_files]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgetl_version": edgetl.__version__,
        "model": prepared.name,
        "recipe": prepared.recipe.text,
        "target": target,
        "input": {
            "shape": list(prepared.graph.input_shape),
            "dtype": "float32",
            "layout": "NCHW" if len(prepared.graph.input_shape) == 3 else "NCL",
            "batch_size": batch_size,
            "preprocess": {"range": [0.0, 1.0], "mean": list(prepared.mean), "std": list(prepared.std)},
        },
        "num_classes": prepared.num_classes,
        "programs": programs,
        "trainable": [{"name": t, "shape": list(params[t].shape), "dtype": "float32"} for t in prepared.trainable],
        "optimizer": {**optimizer.to_dict(), "state": [
            {"name": k, "shape": list(state[k].shape), "dtype": "float32"} for k in state_names]},
        "state_file": state_file.FILE,
        "state_keys": keys,
        "frozen_dtype": prepared.graph.frozen_dtype,
        "seed": prepared.seed,
        **({"head": prepared.head_spec} if prepared.head_spec else {}),
        "summary": prepared.summary(),
        "analytic_memory": {k: v for k, v in mem.breakdown().items() if k != "kept"},
        **(extra or {}),
        "files": {rel: sha256(out / rel) for rel in rels},
    }
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    data = json.dumps(manifest, indent=2).encode()
    if signer is not None:
        _write_atomic(out / signing.SIGNATURE, signing.sign(signer, data))
    elif (out / signing.SIGNATURE).exists():  # a stale signature would only mislead
        os.remove(out / signing.SIGNATURE)
    _write_atomic(out / MANIFEST, data)
    return out
