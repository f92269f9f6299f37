"""Exporters: from a prepared model to an on-device bundle.

    bundle = edgetl.exporters.export(prepared, "onnx", "out/bundle", optimizer, batch_size=32)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from edgetl.errors import EdgeTLError
from edgetl.lowering import Lowering
from edgetl.micro_batch import accumulating, check_target
from edgetl.optim import OptimizerConfig
from edgetl.runtime import signing
from edgetl.runtime.checkpoint import pid_alive
from edgetl.runtime.bundle import FORMAT, MANIFEST
from edgetl.runtime.targets import EXECUTORCH, ONNX, ORT_TRAINING, TARGET_NAMES, TARGETS as _SPECS

from .bundle import write_bundle

TARGETS = TARGET_NAMES


def _exporter(spec):
    """The function that writes `spec`'s programs into a directory (imported only when used)."""
    if spec is ONNX:
        from .onnx import export_onnx as run
    elif spec is ORT_TRAINING:
        from .ort_training import export_ort_training as run
    elif spec is EXECUTORCH:
        from .executorch import export_executorch as run
    return run


def lowering(target: str, weight_block_bytes: int | None = None) -> Lowering:
    """What `target`'s programs need from the step (its exporter's `Lowering`), with frozen weights
    dequantized in row blocks of `weight_block_bytes` when given: what the analytic memory of its
    bundles replays."""
    spec = _SPECS[target]
    if spec is EXECUTORCH:
        from .executorch import lowering as et

        base = et(delegate=True)
    else:  # onnx, and ort-training (whose forward is exported the same way; ORT schedules its backward)
        from .onnx import LOWERING as base
    return dataclasses.replace(base, weight_block_bytes=weight_block_bytes)


# What a bundle holds beside the files its manifest lists; anything else there is the user's.
_COMPANIONS = (MANIFEST, signing.SIGNATURE)


def _replaceable(out: Path) -> None:
    """Refuse an `out` that export may not replace: a file, or a directory holding anything but an
    edgetl bundle (its manifest, the files it lists, its signature)."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        raise EdgeTLError(f"'{out}' is a symbolic link; refusing to overwrite it (give the directory it points to)")
    if not out.is_dir():
        raise EdgeTLError(f"'{out}' exists and is not a directory; refusing to overwrite it")
    entries = list(out.iterdir())
    if not entries:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        listed = set(manifest["files"]) if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        listed = None
    if listed is None:
        raise EdgeTLError(f"'{out}' exists and is not an edgetl bundle; refusing to overwrite it")
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        if p.is_dir() and not p.is_symlink():
            if not any(f.startswith(rel + "/") for f in listed):
                raise EdgeTLError(f"'{out}' holds '{rel}', which is not part of its edgetl bundle; "
                                  f"refusing to overwrite it")
        elif rel not in listed and rel not in _COMPANIONS:
            raise EdgeTLError(f"'{out}' holds '{rel}', which is not part of its edgetl bundle; "
                              f"refusing to overwrite it")


def _prefix(out: Path) -> str:
    """Of the directories an export to `out` works in beside it; they carry the exporter's pid."""
    return f".{out.name}.{os.getpid()}."


def _leftovers(out: Path, suffix: str) -> list[Path]:
    """`.NAME.<pid>.*<suffix>` directories beside `out` whose exporter (pid) is gone."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(\d+)\.[^/]*" + re.escape(suffix))
    found = []
    try:
        for p in out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink() and int(m.group(1)) != os.getpid() \
                    and not pid_alive(int(m.group(1))):
                found.append(p)
    except OSError:
        pass
    return sorted(found)


def _recover(out: Path) -> None:
    """Undo what a killed export left beside `out`: its half-written `.NAME.<pid>.*.tmp`
    directories are removed, and where it was killed between its two renames (NAME absent, the
    previous bundle in `.NAME.<pid>.*.old/bundle`), that bundle is put back at NAME."""
    for tmp in _leftovers(out, ".tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if out.exists() or out.is_symlink():
        return
    kept = [d for d in _leftovers(out, ".old") if (d / "bundle").is_dir()]
    if len(kept) > 1:
        raise EdgeTLError(f"'{out}' is absent and earlier interrupted exports left bundles in "
                          f"{', '.join(repr(str(d / 'bundle')) for d in kept)}; move the one to keep to '{out}'")
    if kept:
        (kept[0] / "bundle").replace(out)
        try:
            kept[0].rmdir()
        except OSError:
            pass


def refuse_current_dir(out: str | Path) -> None:
    """Export moves its bundle into place as a whole directory, which the current directory (or
    one above it) cannot be: refused with a message that says so."""
    out, cwd = Path(out).resolve(), Path.cwd().resolve()
    if cwd == out or cwd.is_relative_to(out):
        raise EdgeTLError(f"'{out}' is the current directory (or holds it); export writes the bundle as a "
                          f"directory of its own: give a new one, such as 'bundle'")


def export(prepared, target: str, out: str | Path, optimizer: OptimizerConfig | None = None,
           batch_size: int = 8, sign_key: str | Path | None = None, weight_block_bytes: int | None = None,
           micro_batch: int | None = None) -> Path:
    """Export `prepared` for `target` into the directory `out`. An existing edgetl bundle there is
    replaced only once the new one is complete; anything else there is refused, never deleted.
    With `sign_key` (an Ed25519 private key file from `edgetl keygen`) the bundle is signed. With
    `weight_block_bytes` the step dequantizes large frozen int8 weights in row blocks of at most
    that many fp32 bytes (`edgetl.lowering.Lowering`; microcontroller-sized RAM), onnx and
    executorch targets. With `micro_batch` (dividing batch_size; onnx and executorch targets) the step program takes
    micro_batch samples and updates the parameters on every batch_size / micro_batch-th call, having
    accumulated the gradients (`edgetl.micro_batch`): the activations of a micro-batch, the result of
    a full batch."""
    spec = _SPECS.get(target) if isinstance(target, str) else None
    if spec is None:
        raise EdgeTLError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EdgeTLError(f"batch_size must be a positive integer, got {batch_size!r}")
    if weight_block_bytes is not None:
        if not isinstance(weight_block_bytes, int) or weight_block_bytes < 1:
            raise EdgeTLError(f"weight_block_bytes must be a positive integer, got {weight_block_bytes!r}")
        if spec is ORT_TRAINING:
            raise EdgeTLError("weight blocks are for the onnx and executorch targets: ONNX Runtime's training "
                              "artifacts derive their own backward from whole weights")
    optimizer = optimizer or OptimizerConfig()
    check_target(spec, batch_size, micro_batch)
    optimizer = accumulating(prepared, optimizer, batch_size, micro_batch)
    step_batch = batch_size // optimizer.accumulate
    # executorch's eval program has a static batch too: the bundle's, not the train step's micro-batch
    eval_batch = {"eval_batch": batch_size} if spec is EXECUTORCH else {}
    signer = None if sign_key is None else signing.load_private_key(sign_key)  # a bad key fails before any work
    out = Path(out)
    refuse_current_dir(out)
    _recover(out)
    _replaceable(out)
    run = _exporter(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` (same file system, so the swap is two renames), then swapped in.
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the bundle's mode
    old = None
    try:
        blocks = {} if weight_block_bytes is None else {"weight_block_bytes": weight_block_bytes}
        # the spec's programs and files, written into tmp
        res = run(prepared, optimizer, step_batch, tmp, **blocks, **eval_batch)
        extra = {**(res.get("extra") or {}), **({"lowering": blocks} if blocks else {})}
        write_bundle(tmp, prepared, spec, optimizer, batch_size, extra or None, signer=signer,
                     more_programs=res.get("programs"), more_files=res.get("files", ()),
                     lowering=lowering(target, weight_block_bytes), micro_batch=step_batch)
        _replaceable(out)  # still only a bundle (nothing was added while exporting)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".old", dir=out.parent))
            out.replace(old / "bundle")
            try:
                tmp.replace(out)
            except BaseException:
                (old / "bundle").replace(out)
                raise
        else:
            tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["TARGETS", "export", "lowering", "refuse_current_dir"]
