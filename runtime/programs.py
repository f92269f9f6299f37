"""Checks of a bundle's programs against their target's spec (targets.py) and the manifest: ONNX
programs before onnxruntime opens them; ExecuTorch programs as their runtime reports them once
loaded (`check_positional_programs`):

- no tensor may keep its data in an external file: onnxruntime would read any path it names
  (also `../x` or an absolute path) and no checksum covers that file. edgetl's exporters never
  write external data, so it is refused outright;
- the manifest must describe the programs' real signatures: input shape and batch size, the
  number of classes of the logits, and each trainable parameter's and optimizer state's name
  and shape, so that a manifest that lies is refused before any training."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BundleError
from .onnx_proto import OnnxSummary, ProtoError, ValueInfo, summarize
from .targets import LOGITS, LOSS, LR, ORT_LABELS, X, Y, ProgramSpec, TargetSpec, param_name, state_name, target_spec

FLOAT, INT64 = 1, 7


_CACHE: dict[str, OnnxSummary] = {}  # by the file's verified sha256: a program is parsed once per process


def read_program(path: Path, role: str, digest: str | None = None) -> OnnxSummary:
    if digest is not None and digest in _CACHE:
        return _CACHE[digest]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the '{role}' program: {e.strerror or type(e).__name__}") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:  # changed since its checksum was read
        raise BundleError(f"the '{role}' program '{path.name}' fails its sha256 check (corrupt or altered)")
    try:
        s = summarize(data)
    except ProtoError as e:
        raise BundleError(f"cannot load the '{role}' program '{path.name}': it is not a valid ONNX model ({e})") from None
    if s.external:
        raise BundleError(f"the '{role}' program '{path.name}' keeps tensor {s.external[0]!r} in an external data "
                          "file, which is refused (edgetl bundles hold every tensor in their checksummed programs)")
    return s


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _expect(role: str, v: ValueInfo | None, name: str, shape: tuple, what: str, elem: int | None = None) -> None:
    """`v` must exist and have `shape` (None in `shape` or in the program's shape: any size)."""
    if v is None:
        raise BundleError(f"cannot load the '{role}' program: it has no input or output {name!r} for {what}; "
                          "the manifest does not match its programs")
    if elem is not None and v.elem_type not in (0, elem):
        raise BundleError(f"the '{role}' program's {name!r} ({what}) has element type {v.elem_type}, expected {elem}")
    if v.shape is None:
        return
    ok = len(v.shape) == len(shape) and all(a is None or b is None or a == b for a, b in zip(v.shape, shape))
    if not ok:
        raise BundleError(f"the manifest does not match its programs: it gives {what} the shape {_fmt(shape)}, "
                          f"but the '{role}' program's {name!r} is {_fmt(v.shape)}")


def _meaning(name: str, manifest: dict, batch: int | None, tensors: dict[str, tuple]) -> tuple[str, tuple, int]:
    """What the program tensor `name` (the naming scheme of targets.py) holds: (description, shape
    the manifest implies, element type). `tensors`: program name -> (manifest name, shape)."""
    if name in tensors:
        tensor, shape = tensors[name]
        return f"tensor {tensor!r}", shape, FLOAT
    if name.startswith("new_") and name[4:] in tensors:
        tensor, shape = tensors[name[4:]]
        return f"the new value of tensor {tensor!r}", shape, FLOAT
    if name == X:
        return "the input images (batch, *input.shape)", (batch, *manifest["input"]["shape"]), FLOAT
    if name in (Y, ORT_LABELS):
        return "the labels (batch,)", (batch,), INT64
    if name in (LR, LOSS):
        return "the learning rate" if name == LR else "the loss", (), FLOAT
    if name == LOGITS:
        return "the logits (batch, num_classes)", (batch, manifest["num_classes"]), FLOAT
    raise AssertionError(f"targets.py names no tensor {name!r}")


def _tensors(manifest: dict, spec: TargetSpec, params: list[str], state: list[str]) -> dict[str, tuple]:
    """Program name -> (manifest name, shape) of the trainable tensors and the optimizer state;
    refusing two tensors on one program name, or a tensor on one of the spec's fixed names."""
    entries = manifest["trainable"] + manifest["optimizer"].get("state", [])
    names = params + state
    tensors = {n: (t["name"], tuple(t["shape"])) for n, t in zip(names, entries)}
    if len(tensors) != len(entries):
        what = "'io.params' gives two parameters" if len(set(params)) != len(params) else "'io.state' gives two tensors"
        raise BundleError(f"{what} the same program input")
    fixed = {n for p in spec.programs for n in p.inputs + p.outputs}
    taken = sorted(set(tensors) & fixed) + sorted(n for n in tensors if n.startswith("new_") and n[4:] in tensors)
    if taken:
        raise BundleError(f"the manifest gives tensor {tensors[taken[0]][0]!r} the program name {taken[0]!r}, "
                          "which names another of the program's tensors")
    return tensors


def _static_batch(p: ProgramSpec, manifest: dict) -> int | None:
    """The batch dimension of a static-batch program: the train step's is the micro-batch, if any."""
    if not p.static_batch:
        return None
    inp = manifest["input"]
    return inp.get("micro_batch", inp["batch_size"]) if p.role == "train_step" else inp["batch_size"]


def _check_onnx(p: ProgramSpec, s: OnnxSummary, manifest: dict, params: list[str], state: list[str],
                tensors: dict[str, tuple]) -> None:
    """An ONNX program against its spec: every input by name (shape and element type), no input
    the manifest does not name (unless ORT binds it itself), and the outputs in order: `loss`
    by position (ORT names it itself), the others by name and shape."""
    batch = _static_batch(p, manifest)
    inputs = {v.name: v for v in s.inputs}
    names = p.input_names(params, state)
    for name in names:
        what, shape, elem = _meaning(name, manifest, batch, tensors)
        _expect(p.role, inputs.get(name), name, shape, what, elem)
    if not p.more_inputs:
        extra = [v.name for v in s.inputs if v.name not in names and v.name not in s.initializers]
        if extra:
            raise BundleError(f"the '{p.role}' program needs input {extra[0]!r}, which the manifest does not name")
    outs = p.output_names(params, state)
    if len(s.outputs) < len(outs) or (not p.more_outputs and len(s.outputs) != len(outs)):
        raise BundleError(f"the '{p.role}' program has {len(s.outputs)} outputs; the manifest's {len(params)} "
                          f"parameters and {len(state)} state tensors need {len(outs)} "
                          f"({', '.join(p.outputs)})")
    for v, name in zip(s.outputs, outs):
        if name == LOSS:
            continue
        what, shape, elem = _meaning(name, manifest, batch, tensors)
        _expect(p.role, v if v.name == name else None, name, shape, what, elem)


def program_names(manifest: dict) -> tuple[list[str], list[str]]:
    """The program names of the trainable tensors and of the optimizer state, in manifest order:
    from the manifest's `io` maps, else (programs bound by position) the spec's names."""
    io = manifest.get("io", {})
    trainable = [t["name"] for t in manifest["trainable"]]
    state = [t["name"] for t in manifest["optimizer"].get("state", [])]
    params = [io["params"][t] for t in trainable] if "params" in io else [param_name(i) for i in range(len(trainable))]
    states = [io["state"][t] for t in state] if "state" in io else [state_name(i) for i in range(len(state))]
    return params, states


def check_onnx_programs(manifest: dict, program_path) -> None:
    """Refuse external data and a manifest that does not describe the programs (see module doc).
    `program_path(role)` resolves a program's file inside the bundle."""
    spec = target_spec(manifest["target"])
    if spec.program_format != "onnx":
        return
    params, state = program_names(manifest)
    tensors = _tensors(manifest, spec, params, state)
    summaries = {role: read_program(program_path(role), role, manifest["files"].get(rel))
                 for role, rel in manifest["programs"].items()}
    for p in spec.programs:
        if not p.opaque:
            _check_onnx(p, summaries[p.role], manifest, params, state, tensors)


def check_positional_programs(manifest: dict, found: dict[str, tuple[list[tuple], int, list[tuple] | None]]) -> None:
    """Programs bound by position (ExecuTorch), as their runtime reports them — role -> (inputs
    [(dtype, shape)], number of outputs, outputs [(dtype, shape)] where reported) — against the
    spec's order and the manifest's shapes."""
    spec = target_spec(manifest["target"])
    params, state = program_names(manifest)
    tensors = _tensors(manifest, spec, params, state)
    for p in spec.programs:
        inputs, num_outputs, outputs = found[p.role]
        batch = _static_batch(p, manifest)
        names = p.input_names(params, state)
        if len(inputs) != len(names):
            raise BundleError(f"the '{p.role}' program has {len(inputs)} inputs; the manifest's {len(params)} "
                              f"parameters and {len(state)} state tensors need {len(names)} ({', '.join(p.inputs)})")
        for i, name in enumerate(names):
            what, shape, _ = _meaning(name, manifest, batch, tensors)
            _expect_shape(p.role, f"input {i}", tuple(inputs[i][1]), shape, what)
        outs = p.output_names(params, state)
        if num_outputs != len(outs):
            raise BundleError(f"the '{p.role}' program has {num_outputs} outputs; the manifest's {len(params)} "
                              f"parameters and {len(state)} state tensors need {len(outs)} ({', '.join(p.outputs)})")
        for i, (name, got) in enumerate(zip(outs, outputs or [])):
            what, shape, _ = _meaning(name, manifest, batch, tensors)
            _expect_shape(p.role, f"output {i}", tuple(got[1]), shape, what)


def _expect_shape(role: str, where: str, got: tuple, shape: tuple, what: str) -> None:
    if len(got) != len(shape) or any(a is not None and a != b for a, b in zip(shape, got)):
        raise BundleError(f"the manifest gives {what} the shape {_fmt(shape)}, but the '{role}' program's "
                          f"{where} is {_fmt(got)}")
