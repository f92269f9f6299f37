"""What every runtime backend provides to the Trainer. Backends hold the trainable parameters
and optimizer state; arrays cross this interface as numpy."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle


THREADS_VAR = "EDGETL_THREADS"  # compute threads a runtime may use, where it lets the caller choose


def threads_from_env() -> int | None:
    """$EDGETL_THREADS as a positive int (None: the runtime's default). `bench/run.py` sets 1, so a
    step's CPU time is one thread's work, with no idle pool thread spinning on a shared machine."""
    v = os.environ.get(THREADS_VAR, "")
    return int(v) if v.isdigit() and int(v) > 0 else None


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM); OSError where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc), or None."""
    try:
        return status_kb("VmRSS") * 1024
    except OSError:  # no /proc (not Linux)
        return None


def library_rss_bytes() -> int | None:
    """The resident pages of this process's shared libraries (every file mapping whose name has
    `.so`: code and read-only data), from /proc/self/smaps; None without it."""
    total, library = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if head and head[0][0] in "0123456789abcdef" and "-" in head[0]:  # a mapping's header line
                    library = len(head) > 5 and ".so" in head[5].rsplit("/", 1)[-1]
                elif library and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except OSError:
        return None
    return total


@dataclass(frozen=True)
class Resident:
    """Resident memory at one moment: all of it, and its shared libraries' pages."""
    total: int
    libraries: int

    @staticmethod
    def now() -> "Resident | None":
        total, libraries = rss_bytes(), library_rss_bytes()
        return None if total is None or libraries is None else Resident(total, libraries)


def above_libraries(peak: int, before: Resident, after: Resident) -> int:
    """`peak` above the level `before` any program was loaded (the runtime's libraries imported), less
    the library pages that became resident since (`after`, taken once the steps ran). Runtimes page
    their libraries in at different times: onnxruntime's at import (in `before`), ExecuTorch's shim
    and torch's while the first programs load and run; counted this way, a library page is never
    training memory, whenever it was first touched."""
    return int(peak - before.total - max(after.libraries - before.libraries, 0))


class Backend(ABC):
    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One training step on a full batch (bundle.batch_size); returns (loss, logits)."""

    @abstractmethod
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for any number of samples (the backend pads or splits as its programs need)."""

    @abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Trainable parameters and optimizer state, keyed by manifest name (copies)."""

    @abstractmethod
    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace parameters and optimizer state (all names of get_state)."""

    @abstractmethod
    def export_inference(self, out: Path) -> list[Path]:
        """Write the trained model as an inference program for the same runtime; return the files."""

    def inference_files(self, out: Path) -> list[Path]:
        """The files export_inference(out) writes (checked before anything is written)."""
        return [Path(out)]

    def state_shapes(self) -> dict[str, tuple]:
        """The shape of every array of get_state (what a checkpoint of this bundle holds)."""
        return self.bundle.tensor_shapes()

    def planned_bytes(self) -> int | None:
        """Memory the runtime plans for a step ahead of time (e.g. ExecuTorch's arena), if any."""
        return None


class HostStateBackend(Backend):
    """A backend whose programs take parameters and optimizer state as inputs and return new
    ones: the state lives here, as numpy arrays in manifest order."""

    params: list[np.ndarray]
    state: list[np.ndarray]

    def get_state(self) -> dict[str, np.ndarray]:
        names = self.bundle.trainable + self.bundle.state_names
        return {n: np.array(v) for n, v in zip(names, self.params + self.state)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        # np.array, not ascontiguousarray, which would turn AdamW's 0-d step counter into shape (1,)
        self.params = [np.array(state[t], dtype=np.float32, order="C") for t in self.bundle.trainable]
        self.state = [np.array(state[s], dtype=np.float32, order="C") for s in self.bundle.state_names]
