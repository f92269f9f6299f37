"""The device-side Trainer: fit, evaluate, predict, checkpoint/resume, export for inference, and
the per-batch pieces fit is made of (train_step, evaluate_batch, get_state/set_state, batches)
for callers that drive training themselves. Imports numpy and a runtime only, never torch."""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import checkpoint as ckpt
from .backends import Backend, make_backend
from .bundle import MANIFEST_DIGEST, Bundle, inside, load_bundle
from .checkpoint import SCHEDULES
from .data import check_images, check_labels, normalize
from .errors import BundleError, CheckpointError, DivergenceError, EdgeRuntimeError, InputError, RuntimeNotice
from .progress import Progress
from .targets import CONTRACT

# Divergence, beyond NaN/Inf: a batch loss this many times the run's first (at least ln C, at
# least 1), or a trainable tensor this many times larger than at the start of the fit (at least 1).
LOSS_GROWTH = float(CONTRACT["divergence"]["loss_growth"])
PARAM_GROWTH = float(CONTRACT["divergence"]["param_growth"])


class _Guard:
    """What one fit needs to tell a diverging step from a good one, and the state to fall back to."""

    def __init__(self, trainer: "Trainer"):
        self.num_classes = trainer.bundle.num_classes
        self.trainable = trainer.bundle.trainable
        state = trainer.backend.get_state()
        self.limits = {t: PARAM_GROWTH * max(float(np.abs(state[t]).max(initial=0.0)), 1.0) for t in self.trainable}
        self.loss_limit: float | None = None
        self.previous: tuple[int, int, dict] | None = None  # (step, epoch, state) before the last good step

    def bad_loss(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss {loss}"
        if self.loss_limit is None:
            self.loss_limit = LOSS_GROWTH * max(loss, math.log(max(self.num_classes, 2)), 1.0)
        elif loss > self.loss_limit:
            return f"loss {loss:.3g}, above {self.loss_limit:.3g}"
        return None

    def bad_state(self, state: dict) -> str | None:
        for name, v in state.items():
            if not np.isfinite(v).all():
                return f"'{name}' is not finite"
        for t in self.trainable:
            top = float(np.abs(state[t]).max(initial=0.0))
            if top > self.limits[t]:
                return f"'{t}' grew to {top:.3g}, above {self.limits[t]:.3g}"
        return None


def _diverged(step: int, why: str, kept: int, lr: float, saved: str = "") -> str:
    return (f"step {step} diverged ({why}); the state is kept at step {kept}{' and ' + saved if saved else ''}. "
            f"Try a lower learning rate (now {lr:.3g}).")


def _divergence(step: int, why: str, kept: int, lr: float) -> DivergenceError:
    err = DivergenceError(_diverged(step, why, kept, lr))
    err.step, err.why, err.kept, err.lr = step, why, kept, lr
    return err


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which fit visits `n` samples in epoch `epoch` of a run with `seed` (epochs
    count from where the run began; the JS runtime draws the same, runtime/js/src/shuffle.js)."""
    return np.random.default_rng(seed + epoch).permutation(n)


class StepResult(NamedTuple):
    loss: float  # the batch's loss before the update
    step_ms: float


@dataclass
class FitResult:
    steps: int  # total optimizer steps taken by this trainer so far
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        """The last step's loss; None when no step was taken (e.g. a resumed run already done)."""
        return self.losses[-1] if self.losses else None

    @property
    def step_ms_median(self) -> float | None:
        return float(np.median(self.step_ms)) if self.step_ms else None


def _scores(logits: np.ndarray, ys: np.ndarray) -> dict:
    logits = logits.astype(np.float64)
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return {"loss": float(-logp[np.arange(len(ys)), ys].mean()),
            "accuracy": float((logits.argmax(1) == ys).mean()), "n": int(len(ys))}


class Trainer:
    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle, self.backend = bundle, backend
        self.step = 0
        self.epoch = 0
        self.seed = 0  # of the last fit (its shuffles), recorded in checkpoints
        self._unreadable: str | None = None  # a checkpoint whose newest generation failed to load
        self._guard: _Guard | None = None
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
        and, if the file exists, training resumes from it: up to the larger of its run's length and
        `epochs` (counted from where that run began), with the same seed and schedule (another one
        is refused) and an explicit `lr` replacing the checkpoint's (with a warning). The run holds a
        lock on `checkpoint`; a second run on it is refused. A step whose loss or parameters blow up
        raises DivergenceError with the last state whose loss was finite and sane kept (and saved
        to `checkpoint`)."""
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
        if checkpoint is None and checkpoint_every:
            raise InputError(f"checkpoint_every={checkpoint_every} needs a checkpoint path to save to")
        seed, epochs, checkpoint_every = int(seed), int(epochs), int(checkpoint_every)
        per_epoch = len(xs) // b
        with ckpt.locked(checkpoint) if checkpoint is not None else contextlib.nullcontext():
            if checkpoint is not None and Path(checkpoint).exists():
                self._resume(checkpoint, per_epoch * epochs, lr, schedule, seed)
            else:
                self.schedule = {"name": schedule, "lr": float(lr if lr is not None else self.schedule["lr"]),
                                 "total_steps": self.step + epochs * per_epoch, "start_step": self.step}
            self.seed = seed
            return self._fit(xs, ys, per_epoch, epochs, seed, checkpoint, checkpoint_every, progress)

    def _resume(self, checkpoint, steps: int, lr: float | None, schedule: str, seed: int) -> None:
        arrays, header, used = self._read_checkpoint(checkpoint)
        s = dict(header["schedule"])
        if header["seed"] != seed:
            raise CheckpointError(f"checkpoint '{used}' is of a run with seed {header['seed']}, not {seed}; "
                                  f"resume it with that seed, or start over with another checkpoint")
        if s["name"] != schedule:
            raise CheckpointError(f"checkpoint '{used}' is of a run with the {s['name']} schedule, not {schedule}; "
                                  f"resume it with that schedule, or start over with another checkpoint")
        if lr is not None and float(lr) != s["lr"]:  # e.g. lowered after a divergence
            warnings.warn(f"resuming checkpoint '{used}' at step {header['step']} with lr {float(lr):.3g} "
                          f"instead of its {s['lr']:.3g}", RuntimeNotice, stacklevel=3)
            s["lr"] = float(lr)
        end = s.get("start_step", 0) + steps
        if end > s["total_steps"]:  # asked for more epochs than the checkpoint's run: go on
            if s["name"] == "cosine":
                warnings.warn(f"checkpoint '{used}' ends its cosine schedule at step {s['total_steps']}; it is "
                              f"stretched to end at step {end}", RuntimeNotice, stacklevel=3)
            s["total_steps"] = end
        self._apply_checkpoint(arrays, header)
        self.schedule = s

    def _fit(self, xs, ys, per_epoch: int, epochs: int, seed: int, checkpoint, checkpoint_every: int,
             progress: bool) -> FitResult:
        b = self.bundle.batch_size
        end = self.schedule["total_steps"] if self.schedule["total_steps"] else self.step + epochs * per_epoch
        # Where this fit began (kept in the checkpoint, so a resume replays the same shuffles even if
        # it is given another `epochs`); never after the current step.
        start = min(self.schedule.get("start_step", end - epochs * per_epoch), self.step)
        result = FitResult(steps=self.step)
        saved = self.step if checkpoint is not None and Path(checkpoint).exists() else None

        def save() -> None:
            nonlocal saved
            if saved != self.step:
                self.save_checkpoint(checkpoint)
                saved = self.step

        self._guard = _Guard(self)  # this fit's: its first loss and starting magnitudes
        bar = Progress(end - self.step, desc="fit", enabled=progress)
        try:
            while self.step < end:
                epoch, offset = divmod(self.step - start, per_epoch)
                order = epoch_order(len(xs), seed, epoch)
                for i in range(offset, per_epoch):
                    idx = order[i * b : (i + 1) * b]
                    loss, ms = self._train_step(xs[idx], ys[idx])
                    result.losses.append(loss)
                    result.step_ms.append(ms)
                    bar.update(1, loss=loss, lr=self.lr_at(self.step))
                    if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                        save()
                self.epoch += 1
                if checkpoint is not None and not checkpoint_every:
                    save()
        except DivergenceError as err:
            if checkpoint is None or getattr(err, "kept", None) is None:
                raise
            try:
                # a newest checkpoint saved after the state kept may hold the diverged state: it does
                # not become the previous generation
                self._save(checkpoint, keep_previous=saved is None or saved <= self.step)
                where = f"saved to checkpoint '{checkpoint}'"
            except CheckpointError as e:
                where = f"not saved ({e})"
            raise DivergenceError(_diverged(err.step, err.why, err.kept, err.lr, where)) from None
        finally:
            bar.close()
            self._guard = None
        if checkpoint is not None:
            save()
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

    def _micro_steps(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step on a full batch: one call of the train_step program, or one per
        micro-batch where it accumulates (it updates on the last); the batch's mean loss and logits."""
        m = self.bundle.micro_batch
        if m == len(x):
            return self.backend.train_step(x, y, lr)
        parts = [self.backend.train_step(x[i : i + m], y[i : i + m], lr) for i in range(0, len(x), m)]
        return float(np.mean([loss for loss, _ in parts])), np.concatenate([lg for _, lg in parts])

    def _train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None,
                    check: bool = True) -> tuple[float, float]:
        lr = self.lr_at(self.step) if lr is None else lr
        if not check:
            t0 = time.perf_counter()
            loss, _ = self._run("train_step", self._micro_steps, x, y, lr)
            self.step += 1
            return loss, 1000 * (time.perf_counter() - t0)
        if self._guard is None:  # kept across train_step calls; fit and set_state start a new one
            self._guard = _Guard(self)
        guard = self._guard
        before = self.backend.get_state()
        t0 = time.perf_counter()
        loss, _ = self._run("train_step", self._micro_steps, x, y, lr, restore=before)
        ms = 1000 * (time.perf_counter() - t0)
        why = guard.bad_loss(loss)
        if why and guard.previous is not None:
            # the loss is that of the state before this step: that state is already bad
            step, epoch, state = guard.previous
            self.backend.set_state(state)
            kept, self.step, self.epoch = self.step, step, epoch
            raise _divergence(kept + 1, why, step, self.lr_at(step))
        why = why or guard.bad_state(self.backend.get_state())
        if why:
            self.backend.set_state(before)
            raise _divergence(self.step + 1, why, self.step, lr)
        guard.previous = (self.step, self.epoch, before)
        self.step += 1
        return loss, ms

    # ---- one batch at a time ------------------------------------------------------------------
    def batches(self, n: int, seed: int = 0, epoch: int = 0) -> list[np.ndarray]:
        """The index arrays of fit's batches in epoch `epoch` (counted from the run's start) over
        `n` samples with `seed`: full batches, a last partial one dropped."""
        b = self.bundle.batch_size
        if not _is_int(n) or n < 0:
            raise InputError(f"n must be a non-negative integer, got {n!r}")
        order = epoch_order(int(n), int(seed), int(epoch))
        return [order[i * b : (i + 1) * b] for i in range(int(n) // b)]

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None, check: bool = True) -> StepResult:
        """One optimizer step on one batch of exactly `batch_size` images `x` (values in [0, 1])
        and labels `y`, at `lr` (default: the schedule's at the current step); `step` counts it.
        A loss or parameters that blow up raise DivergenceError with the last sane state kept, as
        in fit; check=False skips those checks and the copy of the state they need (what the
        profiler measures). Returns (loss, step_ms)."""
        xs, ys = self._xy(x, y)
        b = self.bundle.batch_size
        if len(xs) != b:
            raise InputError(f"the bundle trains on batches of exactly {b} samples, got {len(xs)}")
        if lr is not None and not (isinstance(lr, numbers.Real) and not isinstance(lr, bool)
                                   and math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a positive number, got {lr!r}")
        return StepResult(*self._train_step(xs, ys, None if lr is None else float(lr), check=bool(check)))

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> dict:
        """{"loss" (mean cross-entropy), "accuracy", "n"} on one batch, in one call of the eval
        program (any number of samples the backend accepts; evaluate chunks larger sets)."""
        xs, ys = self._xy(x, y)
        return _scores(self._run("eval", self.backend.logits, xs), ys)

    def get_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters and optimizer state (where the bundle's runtime exposes it),
        by manifest name: numpy copies."""
        return self.backend.get_state()

    def set_state(self, state: dict) -> None:
        """Replace the trainable parameters and optimizer state with `state` (every name of
        get_state, each array of its shape, finite floats); `step` and the schedule stay."""
        shapes = self.backend.state_shapes()
        if not isinstance(state, dict):
            raise InputError(f"state must be a dict of arrays by name, got {type(state).__name__}")
        missing, extra = [k for k in shapes if k not in state], [k for k in state if k not in shapes]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the bundle does not train"
            raise InputError(f"state {what}; it must hold exactly the arrays of get_state()")
        arrays = {}
        for k, shape in shapes.items():
            a = np.asarray(state[k])
            if a.dtype.kind not in "fiu" or a.shape != tuple(shape):
                raise InputError(f"state '{k}' is {a.dtype}{list(a.shape)}, the bundle needs float32{list(shape)}")
            a = np.array(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise InputError(f"state '{k}' holds NaN or Inf values")
            arrays[k] = a
        self.backend.set_state(arrays)
        self._guard = None

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
        return _scores(self.predict_logits(xs), ys)

    # ---- state ------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        return self._save(path)

    def _save(self, path: str | Path, keep_previous: bool = True) -> Path:
        meta = {"step": self.step, "epoch": self.epoch, "schedule": self.schedule, "seed": self.seed,
                "bundle": self.bundle.manifest["files"], "bundle_manifest": self.bundle.manifest[MANIFEST_DIGEST],
                "target": self.bundle.target}
        # After a fall-back to the previous generation, the unreadable newest is not kept as one.
        keep = keep_previous and self._unreadable != str(path)
        saved = ckpt.save_checkpoint(path, self.backend.get_state(), meta, keep_previous=keep)
        self._unreadable = None
        return saved

    def _read_checkpoint(self, path: str | Path) -> tuple[dict, dict, Path]:
        """A checkpoint of this bundle (its newest generation, or the previous one where the newest
        is unreadable): (arrays, header, the file used)."""
        arrays, header, used = ckpt.load_latest(path)
        self._unreadable = str(path) if used != Path(path) else None
        if header["bundle_manifest"] != self.bundle.manifest[MANIFEST_DIGEST] or \
                header["bundle"] != self.bundle.manifest["files"]:
            raise CheckpointError(f"checkpoint '{used}' belongs to another bundle")
        expected = self.backend.state_shapes()
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != expected:
            raise CheckpointError(f"checkpoint '{used}' does not match the bundle's tensors")
        return arrays, header, used

    def _apply_checkpoint(self, arrays: dict, header: dict) -> None:
        self.backend.set_state(arrays)
        self._guard = None
        self.step, self.epoch, self.seed = int(header["step"]), int(header["epoch"]), int(header["seed"])
        self.schedule = dict(header["schedule"])

    def load_checkpoint(self, path: str | Path) -> None:
        self._apply_checkpoint(*self._read_checkpoint(path)[:2])

    def export_inference(self, path: str | Path) -> list[Path]:
        """Write the trained model as an inference program for this runtime (input: images in [0, 1]).
        A path inside the bundle is refused: the bundle's own files are never overwritten."""
        path = Path(path)
        for p in self.backend.inference_files(path):
            if inside(self.bundle.root, p):
                raise InputError(f"'{p}' is inside the bundle '{self.bundle.root}'; write the inference model "
                                 f"elsewhere (the bundle's files are never overwritten)")
        return self.backend.export_inference(path)
