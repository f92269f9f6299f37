"""The device-side Trainer: fit, evaluate, predict, checkpoint/resume, export for inference.
Imports numpy and a runtime only, never torch."""
from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .backends import Backend, make_backend
from .bundle import Bundle, load_bundle
from .data import check_images, check_labels, normalize
from .errors import BundleError, CheckpointError, DivergenceError, EdgeRuntimeError, InputError
from .progress import Progress

SCHEDULES = ("constant", "cosine")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class FitResult:
    steps: int  # total optimizer steps taken by this trainer so far
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def step_ms_median(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else float("nan")


class Trainer:
    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle, self.backend = bundle, backend
        self.step = 0
        self.epoch = 0
        self.schedule = {"name": "constant", "lr": float(bundle.manifest["optimizer"]["lr"]), "total_steps": 0}

    @classmethod
    def load(cls, path: str | Path, trusted_key=None, **backend_options) -> "Trainer":
        """With `trusted_key` (a *.pub path; default $EDGETL_TRUSTED_KEY) only a bundle signed by
        that key loads."""
        bundle = load_bundle(path, trusted_key=trusted_key)
        try:
            backend = make_backend(bundle, **backend_options)
        except EdgeRuntimeError:
            raise
        except Exception as e:  # a program the runtime refuses although its checksum matches (foreign file)
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise BundleError(f"the {bundle.target} runtime cannot load bundle '{path}': {msg}") from e
        return cls(bundle, backend)

    # ---- data -------------------------------------------------------------------------------
    def _x(self, x, what="x") -> np.ndarray:
        return normalize(check_images(x, self.bundle.input_shape, what), self.bundle.manifest)

    def _xy(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        xs = self._x(x)
        return xs, check_labels(y, len(xs), self.bundle.num_classes)

    # ---- training ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        s = self.schedule
        if s["name"] == "cosine" and s["total_steps"] > 0:
            return s["lr"] * 0.5 * (1 + math.cos(math.pi * min(step, s["total_steps"]) / s["total_steps"]))
        return s["lr"]

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 1, lr: float | None = None,
            schedule: str = "constant", seed: int = 0, checkpoint: str | Path | None = None,
            checkpoint_every: int = 0, progress: bool = False) -> FitResult:
        """Train for `epochs` passes over (x, y) in shuffled full batches (a last partial batch is
        dropped). With `checkpoint`, state is saved every `checkpoint_every` steps (0: each epoch)
        and, if the file exists, training resumes from it."""
        # Everything is checked before anything changes: a rejected call leaves the trainer as it was.
        xs, ys = self._xy(x, y)
        b = self.bundle.batch_size
        if len(xs) < b:
            raise InputError(f"the bundle trains on batches of {b}, but only {len(xs)} samples were given")
        if not _is_int(epochs) or epochs < 1:
            raise InputError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if lr is not None and not (isinstance(lr, numbers.Real) and not isinstance(lr, bool)
                                   and math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a positive number, got {lr!r}")
        if not _is_int(seed) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if not _is_int(checkpoint_every) or checkpoint_every < 0:
            raise InputError(f"checkpoint_every must be a non-negative integer, got {checkpoint_every!r}")
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise InputError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
        per_epoch = len(xs) // b
        if checkpoint is not None and Path(checkpoint).exists():
            self.load_checkpoint(checkpoint)
            if lr is not None:  # an explicit lr wins over the checkpoint's (e.g. lowered after a divergence)
                self.schedule["lr"] = float(lr)
        else:
            self.schedule = {"name": schedule, "lr": float(lr if lr is not None else self.schedule["lr"]),
                             "total_steps": self.step + epochs * per_epoch, "start_step": self.step}
        end = self.schedule["total_steps"] if self.schedule["total_steps"] else self.step + epochs * per_epoch
        # Where this fit began (kept in the checkpoint, so a resume replays the same shuffles even if
        # it is given another `epochs`); never after the current step.
        start = min(self.schedule.get("start_step", end - epochs * per_epoch), self.step)
        result = FitResult(steps=self.step)
        bar = Progress(end - self.step, desc="fit", enabled=progress)
        try:
            while self.step < end:
                epoch, offset = divmod(self.step - start, per_epoch)
                order = np.random.default_rng(seed + epoch).permutation(len(xs))
                for i in range(offset, per_epoch):
                    idx = order[i * b : (i + 1) * b]
                    loss, ms = self._train_step(xs[idx], ys[idx])
                    result.losses.append(loss)
                    result.step_ms.append(ms)
                    bar.update(1, loss=loss, lr=self.lr_at(self.step))
                    if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                        self.save_checkpoint(checkpoint)
                self.epoch += 1
                if checkpoint is not None and not checkpoint_every:
                    self.save_checkpoint(checkpoint)
        finally:
            bar.close()
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        result.steps = self.step
        return result

    def _run(self, program: str, fn, *args, restore: dict | None = None):
        """Call the backend; a failure of the runtime itself (e.g. a program that does not match
        the manifest, which the runtime only finds when it runs) becomes a BundleError, with the
        state as it was."""
        try:
            return fn(*args)
        except (EdgeRuntimeError, MemoryError):
            raise
        except Exception as e:
            if restore is not None:
                self.backend.set_state(restore)
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            raise BundleError(f"the {self.bundle.target} runtime failed to run the bundle's '{program}' program "
                              f"(does the manifest match its programs?): {msg}") from e

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        before = self.backend.get_state()
        t0 = time.perf_counter()
        loss, _ = self._run("train_step", self.backend.train_step, x, y, self.lr_at(self.step), restore=before)
        ms = 1000 * (time.perf_counter() - t0)
        if not math.isfinite(loss) or not all(np.isfinite(v).all() for v in self.backend.get_state().values()):
            self.backend.set_state(before)
            raise DivergenceError(f"step {self.step + 1} diverged (loss {loss}); the state is kept at step "
                                  f"{self.step}. Try a lower learning rate (now {self.lr_at(self.step):.3g}).")
        self.step += 1
        return loss, ms

    # ---- inference --------------------------------------------------------------------------
    def predict_logits(self, x: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Logits in chunks of `chunk` samples (default: the training batch, so inference never
        needs more memory than a training step)."""
        chunk = self.bundle.batch_size if chunk is None else chunk
        if not _is_int(chunk) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        xs = self._x(x)
        return np.concatenate([self._run("eval", self.backend.logits, xs[i : i + chunk])
                               for i in range(0, len(xs), chunk)])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_logits(x).argmax(1)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict:
        xs = check_images(x, self.bundle.input_shape)
        ys = check_labels(y, len(xs), self.bundle.num_classes)
        logits = self.predict_logits(xs).astype(np.float64)
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        return {"loss": float(-logp[np.arange(len(ys)), ys].mean()),
                "accuracy": float((logits.argmax(1) == ys).mean()), "n": int(len(ys))}

    # ---- state ------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        meta = {"step": self.step, "epoch": self.epoch, "schedule": self.schedule,
                "bundle": self.bundle.manifest["files"], "target": self.bundle.target}
        return ckpt.save_checkpoint(path, self.backend.get_state(), meta)

    def load_checkpoint(self, path: str | Path) -> None:
        arrays, header = ckpt.load_checkpoint(path)
        if header.get("bundle") != self.bundle.manifest["files"]:
            raise CheckpointError(f"checkpoint '{path}' belongs to another bundle")
        expected = self.bundle.tensor_shapes()
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != expected:
            raise CheckpointError(f"checkpoint '{path}' does not match the bundle's tensors")
        self.backend.set_state(arrays)
        self.step, self.epoch = int(header["step"]), int(header["epoch"])
        self.schedule = dict(header["schedule"])

    def export_inference(self, path: str | Path) -> list[Path]:
        """Write the trained model as an inference program for this runtime (input: images in [0, 1])."""
        return self.backend.export_inference(Path(path))
