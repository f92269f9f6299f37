"""ONNX Runtime's training bindings in a peer Python, for environments that have plain onnxruntime.

onnxruntime-training-cpu 1.19.2 is the last release of ORT's Python training bindings: it exists for
Python <= 3.11 only, and it installs into the same `onnxruntime` folder as plain onnxruntime, so it
cannot share an environment with the light install's current onnxruntime. Where the bindings are
not importable in this process, the `ort-training` target runs in a peer: a Python 3.11 venv holding
exactly PEER_REQUIREMENTS, created once on demand (`python3.11 -m venv`, then pip from the
registry) at $EDGETL_ORT_TRAINING_VENV (default: venv-ort-training-1.19.2 in $EDGETL_CACHE or
~/.cache/edgetl). The host's ort-training export runs `generate_artifacts` there, and
`OrtTrainingPeerBackend` runs this runtime's own `OrtTrainingBackend` there, in a child process
loaded from this source directory, answering one call at a time: a JSON header and an .npz of
arrays (never pickled), each length-prefixed, over the child's stdin and stdout."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, CheckpointError, EdgeRuntimeError, InputError
from .base import Backend

ORT_TRAINING_VERSION = "1.19.2"
PEER_PYTHON = "3.11"
PEER_REQUIREMENTS = (f"onnxruntime-training-cpu=={ORT_TRAINING_VERSION}", "onnx==1.17.0", "numpy>=2.0,<3",
                     "flatbuffers>=23")
RUNTIME_DIR = Path(__file__).resolve().parent.parent  # the edgetl.runtime package

# Imports this runtime in the peer (which has no edgetl installed) as `edgetl.runtime`, then runs
# argv[2] ("serve" or "cli") with the remaining arguments.
_BOOT = """
import importlib.util, sys, types
src, what, args = sys.argv[1], sys.argv[2], sys.argv[3:]
pkg = types.ModuleType("edgetl"); pkg.__path__ = []; sys.modules["edgetl"] = pkg
spec = importlib.util.spec_from_file_location("edgetl.runtime", src + "/__init__.py", submodule_search_locations=[src])
mod = importlib.util.module_from_spec(spec); sys.modules["edgetl.runtime"] = mod; spec.loader.exec_module(mod)
if what == "serve":
    from edgetl.runtime.backends.ort_peer import serve; serve(args)
else:
    import runpy; sys.argv = ["edgetl.runtime", *args]; runpy.run_module("edgetl.runtime", run_name="__main__")
"""


def bindings_here() -> bool:
    """Whether this process can import ORT's training bindings (onnxruntime-training)."""
    try:
        from onnxruntime.capi import _pybind_state as C
    except ImportError:
        return False
    return hasattr(C, "Module") and hasattr(C, "Optimizer")


def _venv_dir() -> Path:
    explicit = os.environ.get("EDGETL_ORT_TRAINING_VENV")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("EDGETL_CACHE", Path.home() / ".cache" / "edgetl"))
    return cache / f"venv-ort-training-{ORT_TRAINING_VERSION}"


def _base_python() -> str:
    found = shutil.which(f"python{PEER_PYTHON}")
    if found:
        return found
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == PEER_PYTHON:
        return sys.executable
    raise EdgeRuntimeError(f"the ort-training target needs onnxruntime-training-cpu {ORT_TRAINING_VERSION}, which "
                           f"runs on Python {PEER_PYTHON} only: install python{PEER_PYTHON} (edgetl then builds its "
                           "own environment for it) or use the onnx target")


def peer_python() -> Path:
    """The peer's Python, creating its venv first if needed (minutes, once; needs the registry)."""
    venv = _venv_dir()
    python, ready = venv / "bin" / "python", venv / ".edgetl-ready"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if ready.is_file() and ready.read_text() == wanted and python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it ready
        if ready.is_file() and ready.read_text() == wanted and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[_base_python(), "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER_REQUIREMENTS]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = " ".join((r.stderr or r.stdout).split())[-300:]
                raise EdgeRuntimeError(f"cannot build the ort-training environment at {venv}: {tail}")
        ready.write_text(wanted)
    return python


def peer_command(*runtime_args: str) -> list[str]:
    """A command running `python -m edgetl.runtime ARGS...` (the device CLI) in the peer."""
    return [str(peer_python()), "-I", "-c", _BOOT, str(RUNTIME_DIR), "cli", *runtime_args]


# ---- messages: 8-byte length + JSON header, 8-byte length + npz ------------------------------------
def _send(stream, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    buf = io.BytesIO()
    np.savez(buf, **(arrays or {}))
    head = json.dumps(header).encode()
    stream.write(len(head).to_bytes(8, "little") + head + len(buf.getvalue()).to_bytes(8, "little") + buf.getvalue())
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError
    return data


def _receive(stream) -> tuple[dict, dict[str, np.ndarray]]:
    head = json.loads(_read_exact(stream, int.from_bytes(_read_exact(stream, 8), "little")))
    payload = _read_exact(stream, int.from_bytes(_read_exact(stream, 8), "little"))
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return head, {k: z[k] for k in z.files}


_ERRORS = {c.__name__: c for c in (BundleError, CheckpointError, InputError, EdgeRuntimeError)}


def serve(argv: list[str]) -> None:
    """The peer side: one OrtTrainingBackend on the bundle at argv[0], driven over stdin/stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the message stream
    inp = sys.stdin.buffer
    from ..bundle import load_bundle
    from .ort_training import OrtTrainingBackend

    backend = None
    while True:
        try:
            head, arrays = _receive(inp) if backend is not None else ({"op": "open"}, {})
        except EOFError:
            return
        try:
            op, reply, data = head["op"], {}, {}
            if op == "open":
                backend = OrtTrainingBackend(load_bundle(argv[0]), arena=argv[1] == "1")
                reply["shapes"] = {k: list(v) for k, v in backend.state_shapes().items()}
            elif op == "train_step":
                loss, data["logits"] = backend.train_step(arrays["x"], arrays["y"], head["lr"])
                reply["loss"] = loss
            elif op == "logits":
                data["logits"] = backend.logits(arrays["x"])
            elif op == "get_state":
                data = backend.get_state()
            elif op == "set_state":
                backend.set_state(arrays)
            elif op == "export_inference":
                reply["files"] = [str(p) for p in backend.export_inference(Path(head["out"]))]
            else:
                raise EdgeRuntimeError(f"unknown peer call '{op}'")
            _send(out, reply, data)
        except Exception as e:  # reported to the caller, who raises it there
            _send(out, {"error": type(e).__name__, "message": " ".join(str(e).split())[:500] or type(e).__name__})
            if backend is None:
                return


def _stop(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class OrtTrainingPeerBackend(Backend):
    """OrtTrainingBackend in the peer Python: the same calls, the arrays copied across a pipe."""

    out_of_process = True  # its memory is the child's: profile refuses it (run the profile in the peer)

    def __init__(self, bundle: Bundle, arena: bool = False):
        super().__init__(bundle)
        env = {k: v for k, v in os.environ.items() if k != "EDGETL_TRUSTED_KEY"}  # verified here already
        cmd = [str(peer_python()), "-I", "-c", _BOOT, str(RUNTIME_DIR), "serve", str(bundle.root), "1" if arena else "0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        weakref.finalize(self, _stop, self.proc)
        head, _ = self._reply()
        self.shapes = {k: tuple(v) for k, v in head["shapes"].items()}

    def _reply(self) -> tuple[dict, dict[str, np.ndarray]]:
        try:
            head, arrays = _receive(self.proc.stdout)
        except (EOFError, ValueError):
            raise EdgeRuntimeError("the ort-training runtime process ended unexpectedly") from None
        if "error" in head:
            raise _ERRORS.get(head["error"], EdgeRuntimeError)(head["message"])
        return head, arrays

    def _call(self, op: str, arrays: dict[str, np.ndarray] | None = None, **fields) -> tuple[dict, dict]:
        try:
            _send(self.proc.stdin, {"op": op, **fields}, arrays)
        except (BrokenPipeError, ValueError):
            raise EdgeRuntimeError("the ort-training runtime process has ended") from None
        return self._reply()

    def train_step(self, x, y, lr):
        head, out = self._call("train_step", {"x": x, "y": y}, lr=float(lr))
        return float(head["loss"]), out["logits"]

    def logits(self, x):
        return self._call("logits", {"x": x})[1]["logits"]

    def get_state(self):
        return self._call("get_state")[1]

    def set_state(self, state):
        self._call("set_state", {k: np.asarray(v) for k, v in state.items()})

    def state_shapes(self) -> dict[str, tuple]:
        return dict(self.shapes)

    def export_inference(self, out: Path) -> list[Path]:
        return [Path(p) for p in self._call("export_inference", out=str(Path(out).resolve()))[0]["files"]]
