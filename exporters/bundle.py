"""Writing a bundle: programs, initial state (safetensors), and a manifest with checksums."""
from __future__ import annotations

import json
import os
from pathlib import Path

from edgetl.runtime import signing
from edgetl.runtime import state as state_file
from edgetl.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST, manifest_digest, sha256
from edgetl.runtime.targets import TargetSpec, io_maps


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bundle(out: Path, prepared, spec: TargetSpec, optimizer, batch_size: int, extra: dict | None = None,
                 signer=None, more_programs: dict[str, str] | None = None, more_files=(), lowering=None,
                 micro_batch: int | None = None) -> Path:
    """Complete a bundle for the target `spec` in `out`, whose programs and required files (the
    spec's names) are already written; `extra`: target-specific manifest fields. The manifest is
    written last, atomically, so a half-written bundle never looks valid; with `signer` (an
    Ed25519 private key) its signature, `manifest.sig`, is written just before it. `lowering`: how
    the programs run the step (its weight blocks count in the analytic memory). `micro_batch`: the
    samples the train_step program takes, when fewer than batch_size (recorded as `input.micro_batch`)."""
    import edgetl

    params = prepared.initial_params()
    state = optimizer.init_state(params)
    # A runtime that keeps its own optimizer state (ONNX Runtime's training API) gets none from us.
    state_names = optimizer.state_names(prepared.trainable) if spec.state_in_program else []
    arrays = {**{t: params[t] for t in prepared.trainable}, **{k: state[k] for k in state_names}}
    keys = {name: name for name in arrays}  # the state file's tensors are named as the manifest names them
    (out / state_file.FILE).write_bytes(state_file.encode({n: v.detach().cpu().numpy() for n, v in arrays.items()}))
    micro = micro_batch if micro_batch is not None and micro_batch != batch_size else None
    mem = prepared.memory(micro or batch_size, optimizer, lowering)
    # `more_programs` / `more_files`: optional ones beyond the spec's (e.g. LoRA's merged inference program)
    programs = {**spec.program_files(), **(more_programs or {})}
    rels = list(programs.values()) + [state_file.FILE, *spec.files, *more_files]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgetl_version": edgetl.__version__,
        "model": prepared.name,
        "recipe": prepared.recipe.text,
        "target": spec.name,
        "input": {
            "shape": list(prepared.graph.input_shape),
            "dtype": "float32",
            "layout": "NCHW" if len(prepared.graph.input_shape) == 3 else "NCL",
            "batch_size": batch_size,
            **({"micro_batch": micro} if micro else {}),
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
        "io": io_maps(spec, prepared.trainable, state_names),
        # informational (the spec says it): the runtime, not the state file, holds the optimizer state
        **({} if spec.state_in_program else {"optimizer_state_in_runtime": True}),
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
