"""The `ort-training` target on ONNX Runtime's training bindings. The Python package
`onnxruntime.training.api` imports torch, so this talks to the compiled bindings directly.
ORT keeps the optimizer state (AdamW's moments and step) inside its CheckpointState, which the
bindings do not expose: get_state/set_state carry it through the checkpoint file
(`ort_checkpoint`), so a resume or a divergence rollback keeps it.

ORT's training API opens its programs and checkpoint by path, so the backend never gives it the
bundle's paths: the bundle's files, read once and checked against the manifest's sha256, are copied
into a private (0700) temporary directory, and ORT opens them there (external data included). A file
swapped in the bundle after it was loaded is never read. The directory is removed on close(), when
the backend is collected, or at exit."""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError
from ..programs import program_names
from ..targets import LOGITS
from .base import Backend, Resident
from .onnx import session_options
from .ort_checkpoint import STEP, read_optimizer_state, write_optimizer_state


class OrtTrainingBackend(Backend):
    def __init__(self, bundle: Bundle, arena: bool = False):
        super().__init__(bundle)
        from onnxruntime.capi import _pybind_state as C

        self.C = C
        self.before_programs = Resident.now()  # the runtime's libraries loaded, no program yet
        (checkpoint,) = bundle.spec.files
        if checkpoint not in bundle.manifest["files"]:
            raise BundleError(f"{bundle.target} bundle lacks its {checkpoint!r} file")
        self.device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        self.so = session_options(arena)
        self.pnames = program_names(bundle.manifest)[0]
        self.names = dict(zip(self.pnames, bundle.trainable))
        self.scratch = tempfile.mkdtemp(prefix="edgetl-ort-")  # mode 0700
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.scratch, True)
        self.files = self._private_copy()
        self._open(C.load_checkpoint(str(self.files / checkpoint)))
        self.set_state(bundle.initial_state())
        self.shapes = {k: tuple(v.shape) for k, v in self.get_state().items()}

    def _private_copy(self) -> Path:
        """The bundle's files, as checked, in the private directory; where ORT opens them."""
        root = Path(self.scratch) / "bundle"
        for rel in self.bundle.manifest["files"]:
            dst = root.joinpath(*rel.split("/"))  # safe_path checked `rel` when the bundle was loaded
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(dst, "wb") as f:
                f.write(self.bundle.file_bytes(rel))
        return root

    def close(self) -> None:
        """Remove the private copy of the bundle (the backend is unusable afterwards)."""
        self._cleanup()

    def _open(self, state) -> None:
        # ORT's Module and Optimizer hold a bare pointer into their CheckpointState: they must go before it,
        # when a new state replaces it and when this backend is collected (attributes are released in the
        # order they were first set). The old order freed the state first: `free(): invalid next size`.
        self.module = self.optimizer = None
        self.state = state
        programs = self.bundle.manifest["programs"]

        def program(role: str) -> Path:
            return self.files.joinpath(*programs[role].split("/"))
        self.module = self.C.Module(str(program("training")), state, str(program("eval")), self.device, self.so)
        self.optimizer = self.C.Optimizer(str(program("optimizer")), state, self.device, self.so)
        self.lr = None

    def _saved(self) -> bytes:
        """The CheckpointState as ORT saves it, optimizer state included."""
        path = os.path.join(self.scratch, "state")
        self.C.save_checkpoint(self.state, path, True)
        with open(path, "rb") as f:
            return f.read()

    def _run(self, train: bool, inputs: list[np.ndarray]) -> list[np.ndarray]:
        fetches = self.C.OrtValueVector()
        (self.module.train_step if train else self.module.eval_step)(inputs, fetches)
        return [fetches[i].numpy() for i in range(len(fetches))]

    def train_step(self, x, y, lr):
        if lr != self.lr:
            self.optimizer.set_learning_rate(float(lr))
            self.lr = lr
        loss, logits = self._run(True, [x, y])
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return float(loss), logits

    def logits(self, x):
        # The eval model carries the loss; labels are required but do not affect the logits.
        return self._run(False, [x, np.zeros(len(x), dtype=np.int64)])[1]

    def get_state(self):
        params = {t: np.array(self.state.get_parameter(p).data.numpy()) for t, p in zip(self.bundle.trainable,
                                                                                       self.pnames)}
        return {**params, **read_optimizer_state(self._saved(), self.names)}

    def set_state(self, state):
        """Parameters, and where `state` holds them (all of get_state's names), the optimizer's
        moments and step; the bundle's initial state has parameters only."""
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        if STEP in state:
            path = os.path.join(self.scratch, "state")
            data = write_optimizer_state(self._saved(), self.names, state)
            with open(path, "wb") as f:
                f.write(data)
            self._open(self.C.load_checkpoint(path))
        for t, p in zip(self.bundle.trainable, self.pnames):
            value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state[t], dtype=np.float32))
            self.state.copy_parameter_from(p, value._ortvalue)

    def state_shapes(self) -> dict[str, tuple]:
        return dict(self.shapes)

    def export_inference(self, out: Path) -> list[Path]:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.module.export_model_for_inferencing(str(out), [LOGITS])
        return [out]
