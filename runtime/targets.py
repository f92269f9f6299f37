"""The bundle contract of each target, stated once, as data: `contract.json` beside this file, which
the JavaScript runtime reads too (runtime/js/src/contract.js is generated from it; tests on both
sides keep the two equal). BUNDLE.md renders the specs; a test keeps the two equal.

A target is the kind of device runtime a bundle is exported for. Its spec says which programs the
bundle holds (role in the manifest's `programs`, file name, input and output signature), which
files it needs beside them, and where the optimizer state lives. The exporters, the backends, the
manifest validator and both command lines read these specs; target names appear nowhere else.

One naming scheme for every program's tensors: `x` the normalised images, `y` the int64 labels,
`lr` the learning rate (a float32 scalar), `loss`, `logits`; `param.*` stands for the trainable
tensors and `state.*` for the optimizer state, both in manifest order, whose program names the
manifest's `io.params` / `io.state` give (exporters name them `param.0`, `param.1`, ...,
`state.0`, ...); `new_param.*` / `new_state.*` are their updated values (`new_` + the input's
name). The one exception is ONNX Runtime's own: its `generate_artifacts` names the labels input
`labels` and the loss output itself (format version 1 keeps ORT's names)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files

from .errors import BundleError

CONTRACT_FILE = "contract.json"
# The contract's facts (formats, versions, file names, tensor names, targets), for every module here.
CONTRACT: dict = json.loads(files(__package__).joinpath(CONTRACT_FILE).read_text(encoding="utf-8"))

_N = CONTRACT["tensor_names"]
X, Y, LR, LOSS, LOGITS = _N["x"], _N["y"], _N["lr"], _N["loss"], _N["logits"]
PARAMS, STATE = _N["params"], _N["state"]
NEW_PARAMS, NEW_STATE = _N["new_params"], _N["new_state"]
ORT_LABELS = _N["ort_labels"]

# How a runtime binds a program's tensors: by their names, or by position (ExecuTorch programs
# carry no names: the spec's order is the program's order).
BY_NAME, BY_POSITION = "name", "position"
# Where the optimizer state lives: in the bundle's state file, held by the runtime and passed
# through the train program (an input and an output of every step); or inside ONNX Runtime's
# training checkpoint, which ORT initialises and updates itself (the state file then holds none).
STATE_IN_PROGRAM, STATE_IN_ORT_CHECKPOINT = "program", "ort-checkpoint"


def param_name(i: int) -> str:
    """The program name exporters give the i-th trainable tensor (manifest order)."""
    return f"{_N['param_prefix']}{i}"


def state_name(i: int) -> str:
    """The program name exporters give the i-th optimizer state tensor (manifest order)."""
    return f"{_N['state_prefix']}{i}"


def new_name(name: str) -> str:
    """The output name of the updated value of the input `name`."""
    return f"{_N['new_prefix']}{name}"


@dataclass(frozen=True)
class ProgramSpec:
    """One program of a bundle. `inputs`/`outputs` use the naming scheme above, in the program's
    order. `static_batch`: the program's batch dimension is the manifest's `input.batch_size`
    (else any batch). `more_inputs`/`more_outputs`: ONNX Runtime's training programs have further
    tensors that ORT binds itself (frozen weights, gradient buffers and outputs), which the
    manifest does not describe. `opaque`: a program whose signature is its runtime's own and is
    not checked (ORT's optimizer model)."""
    role: str
    file: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    static_batch: bool = False
    more_inputs: bool = False
    more_outputs: bool = False
    opaque: bool = False

    def input_names(self, params: list[str], state: list[str]) -> list[str]:
        """The concrete inputs, given the program names of the trainable tensors and the state."""
        return _expand(self.inputs, params, state)

    def output_names(self, params: list[str], state: list[str]) -> list[str]:
        return _expand(self.outputs, params, state)


def _expand(names: tuple[str, ...], params: list[str], state: list[str]) -> list[str]:
    groups = {PARAMS: list(params), STATE: list(state), NEW_PARAMS: [new_name(p) for p in params],
              NEW_STATE: [new_name(s) for s in state]}
    out: list[str] = []
    for n in names:
        out.extend(groups.get(n, [n]))
    return out


@dataclass(frozen=True)
class TargetSpec:
    name: str
    summary: str  # one line, for command-line help and BUNDLE.md
    program_format: str  # "onnx" or "pte" (ExecuTorch)
    bind: str  # BY_NAME or BY_POSITION
    programs: tuple[ProgramSpec, ...]
    files: tuple[str, ...] = ()  # required files beside the programs and the state file
    optimizer_state: str = STATE_IN_PROGRAM
    sgd_momentum: bool = True  # whether its runtime's SGD has momentum
    # whether its train_step may take micro-batches (`input.micro_batch`: fewer samples than the batch,
    # gradients accumulated in the optimizer state); the exporters and `edgetl plan` read it
    micro_batches: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(p.role for p in self.programs)

    def program(self, role: str) -> ProgramSpec:
        for p in self.programs:
            if p.role == role:
                return p
        raise KeyError(role)

    def program_files(self) -> dict[str, str]:
        """The manifest's `programs` as the exporters write it: role -> file name."""
        return {p.role: p.file for p in self.programs}

    @property
    def state_in_program(self) -> bool:
        return self.optimizer_state == STATE_IN_PROGRAM


def _spec(t: dict) -> TargetSpec:
    programs = tuple(ProgramSpec(**{**p, "inputs": tuple(p.get("inputs", ())), "outputs": tuple(p.get("outputs", ()))})
                     for p in t["programs"])
    return TargetSpec(**{**t, "programs": programs, "files": tuple(t["files"])})


TARGETS: dict[str, TargetSpec] = {t["name"]: _spec(t) for t in CONTRACT["targets"]}
ONNX, ORT_TRAINING, EXECUTORCH = TARGETS["onnx"], TARGETS["ort-training"], TARGETS["executorch"]
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)


def io_maps(spec: TargetSpec, trainable: list[str], state: list[str]) -> dict[str, dict[str, str]]:
    """The manifest's `io` as exporters write it: manifest name -> program name, for the groups
    the target's programs take (`params` for `param.*`, `state` for `state.*`)."""
    takes = {n for p in spec.programs for n in p.inputs}
    io = {}
    if PARAMS in takes:
        io["params"] = {t: param_name(i) for i, t in enumerate(trainable)}
    if STATE in takes:
        io["state"] = {s: state_name(i) for i, s in enumerate(state)}
    return io


def target_spec(name) -> TargetSpec:
    """The spec of the target `name`; an unknown one is a BundleError naming the known ones."""
    spec = TARGETS.get(name) if isinstance(name, str) else None
    if spec is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise BundleError(f"unknown target {shown}; this runtime runs {', '.join(TARGET_NAMES)}")
    return spec


def targets_help() -> str:
    """One line per target, for command-line help."""
    return "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values())


__all__ = ["BY_NAME", "BY_POSITION", "CONTRACT", "EXECUTORCH", "LOGITS", "LOSS", "LR", "NEW_PARAMS", "NEW_STATE", "ONNX",
           "ORT_LABELS", "ORT_TRAINING", "PARAMS", "STATE", "STATE_IN_ORT_CHECKPOINT", "STATE_IN_PROGRAM",
           "TARGETS", "TARGET_NAMES", "X", "Y", "ProgramSpec", "TargetSpec", "io_maps", "new_name", "param_name",
           "state_name", "target_spec", "targets_help"]
