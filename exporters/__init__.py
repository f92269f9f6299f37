"""Exporters: from a prepared model to an on-device bundle.

    bundle = edgetl.exporters.export(prepared, "onnx", "out/bundle", optimizer, batch_size=32)
"""
from __future__ import annotations

import shutil
from pathlib import Path

from edgetl.errors import EdgeTLError
from edgetl.optim import OptimizerConfig
from edgetl.runtime import signing

from .bundle import write_bundle

TARGETS = ("onnx", "ort-training", "executorch")


def export(prepared, target: str, out: str | Path, optimizer: OptimizerConfig | None = None,
           batch_size: int = 8, sign_key: str | Path | None = None) -> Path:
    """Export `prepared` for `target` into the directory `out` (replaced if it exists); with
    `sign_key` (an Ed25519 private key file from `edgetl keygen`) the bundle is signed."""
    if target not in TARGETS:
        raise EdgeTLError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EdgeTLError(f"batch_size must be a positive integer, got {batch_size!r}")
    optimizer = optimizer or OptimizerConfig()
    signer = None if sign_key is None else signing.load_private_key(sign_key)  # a bad key fails before any work
    out = Path(out)
    if out.exists():
        if not (out / "manifest.json").exists() and any(out.iterdir()):
            raise EdgeTLError(f"'{out}' exists and is not an edgetl bundle; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if target == "onnx":
        from .onnx import export_onnx as run
    elif target == "ort-training":
        from .ort_training import export_ort_training as run
    else:
        from .executorch import export_executorch as run
    res = run(prepared, optimizer, batch_size, out)
    return write_bundle(out, prepared, target, optimizer, batch_size, res["programs"], res.get("extra"),
                        res.get("extra_files", []), signer=signer)


__all__ = ["TARGETS", "export"]
