"""Checks of a bundle's ONNX programs before onnxruntime opens them (the ExecuTorch backend checks
its own programs' inputs when it loads them):

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

FLOAT, INT64 = 1, 7
ONNX_TARGETS = ("onnx", "ort-training")


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


def _check_graph(role: str, s: OnnxSummary, manifest: dict, batch: int | None, params: dict[str, tuple],
                 labels: str | None) -> None:
    """`params`: program input name -> (manifest name, shape)."""
    inputs = {v.name: v for v in s.inputs}
    outputs = {v.name: v for v in s.outputs}
    shape = tuple(manifest["input"]["shape"])
    _expect(role, inputs.get("x"), "x", (batch, *shape), "the input images (batch, *input.shape)", FLOAT)
    if labels is not None:
        _expect(role, inputs.get(labels), labels, (batch,), "the labels (batch,)", INT64)
    _expect(role, outputs.get("logits"), "logits", (batch, manifest["num_classes"]),
            "the logits (batch, num_classes)", FLOAT)
    for name, (tensor, want) in params.items():
        _expect(role, inputs.get(name), name, want, f"tensor {tensor!r}", FLOAT)


def check_onnx_programs(manifest: dict, program_path) -> None:
    """Refuse external data and a manifest that does not describe the programs (see module doc).
    `program_path(role)` resolves a program's file inside the bundle."""
    target = manifest["target"]
    if target not in ONNX_TARGETS:
        return
    io = manifest.get("io", {})
    by_io = {io["params"][t["name"]]: (t["name"], tuple(t["shape"])) for t in manifest["trainable"]}
    if len(by_io) != len(manifest["trainable"]):
        raise BundleError("'io.params' gives two parameters the same program input")
    summaries = {role: read_program(program_path(role), role, manifest["files"].get(rel))
                 for role, rel in manifest["programs"].items()}
    b = manifest["input"]["batch_size"]
    if target == "onnx":
        states = {io["state"][t["name"]]: (t["name"], tuple(t["shape"])) for t in manifest["optimizer"].get("state", [])}
        if len(states) != len(manifest["optimizer"].get("state", [])) or set(states) & set(by_io):
            raise BundleError("'io.state' gives two tensors the same program input")
        train = summaries["train_step"]
        _check_graph("train_step", train, manifest, b, {**by_io, **states}, "y")
        # the backend reads outputs by position: loss, logits, new parameters, new state
        n = 2 + len(by_io) + len(states)
        if len(train.outputs) != n:
            raise BundleError(f"the 'train_step' program has {len(train.outputs)} outputs; the manifest's "
                              f"{len(by_io)} parameters and {len(states)} state tensors need {n}")
        ev = summaries["eval"]
        _check_graph("eval", ev, manifest, None, by_io, None)
        extra = [v.name for v in ev.inputs if v.name != "x" and v.name not in by_io and v.name not in ev.initializers]
        if extra:
            raise BundleError(f"the 'eval' program needs input {extra[0]!r}, which the manifest does not name")
    else:
        for role in ("training", "eval"):
            _check_graph(role, summaries[role], manifest, None, by_io, "labels")


def check_executorch_programs(manifest: dict, train_inputs: list[tuple], eval_inputs: list[tuple],
                              train_outputs: int, eval_outputs: list[tuple] | None = None) -> None:
    """The ExecuTorch programs' input shapes (static: [(dtype, shape)] as the runtime reports
    them, in the order x, y, lr, parameters, state; eval: x, parameters) and, where the runtime
    reports them, the eval program's logits (batch, num_classes), against the manifest."""
    b, shape = manifest["input"]["batch_size"], tuple(manifest["input"]["shape"])
    params = [tuple(t["shape"]) for t in manifest["trainable"]]
    state = [tuple(t["shape"]) for t in manifest["optimizer"].get("state", [])]
    names = [t["name"] for t in manifest["trainable"] + manifest["optimizer"].get("state", [])]
    want = [("the input images (batch, *input.shape)", (b, *shape)), ("the labels (batch,)", (b,)),
            ("the learning rate", None), *((f"tensor {n!r}", s) for n, s in zip(names, params + state))]
    for i, (what, expected) in enumerate(want):
        got = tuple(train_inputs[i][1])
        if expected is not None and got != expected:
            raise BundleError(f"the manifest gives {what} the shape {_fmt(expected)}, but the 'train_step' "
                              f"program's input {i} is {_fmt(got)}")
    if train_outputs != len(want) - 1:
        raise BundleError(f"the 'train_step' program has {train_outputs} outputs; the manifest's {len(params)} "
                          f"parameters and {len(state)} state tensors need {len(want) - 1}")
    if len(eval_inputs) != 1 + len(params) or tuple(eval_inputs[0][1][1:]) != shape:
        raise BundleError("the 'eval' program's inputs do not match the manifest's input shape and parameters")
    for i, (n, s) in enumerate(zip(names, params), start=1):
        if tuple(eval_inputs[i][1]) != s:
            raise BundleError(f"the manifest gives tensor {n!r} the shape {_fmt(s)}, but the 'eval' program's "
                              f"input {i} is {_fmt(eval_inputs[i][1])}")
    if eval_outputs is not None:
        logits = tuple(eval_outputs[0][1]) if eval_outputs else ()
        if len(logits) != 2 or logits[1] != manifest["num_classes"]:
            raise BundleError(f"the manifest says num_classes {manifest['num_classes']}, but the 'eval' program's "
                              f"logits are {_fmt(logits)}")
