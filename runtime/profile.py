"""Measure a bundle's training memory and step time on this machine, torch-free.

The measured peak is the process's peak resident memory while K real steps run, above the level
just before the first measured step (Linux: VmHWM is reset through /proc/self/clear_refs), plus
the runtime's own planned arena where it has one (ExecuTorch allocates it at load). By default
one warm-up step runs first, as in any training loop after its first step: what runtimes set up
lazily on a first run (XNNPACK's packed weights, onnxruntime's caches) is then resident, like the
weights, and not counted as training memory; `--warmup 0` counts it.
The analytic model is compared on the same footing: its peak minus what is resident before the
step (frozen weights, parameters, optimizer state, and the batch unless the runtime copies it into
its planned arena).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

DEVICES_FILE = Path(__file__).with_name("devices.json")


def devices() -> dict[str, dict]:
    return {k: v for k, v in json.loads(DEVICES_FILE.read_text()).items() if not k.startswith("_")}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Profile:
    model: str
    recipe: str
    target: str
    batch_size: int
    input_shape: list[int]
    steps: int
    warmup: int
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    analytic_peak_bytes: int
    analytic_step_bytes: int  # analytic peak minus what is resident before the step
    measured_peak_bytes: int  # measured above the pre-step level (+ planned arena)
    measured_vs_analytic: float  # measured_peak_bytes / analytic_step_bytes
    planned_bytes: int | None
    process_peak_bytes: int  # whole process (runtime libraries included)
    breakdown: dict
    budget_bytes: int | None = None
    device: str | None = None
    counts: str | None = None
    fits: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_steps(step, steps: int) -> tuple[int, list[float], int]:
    """Run `step()` `steps` times: (peak RSS above the pre-step level, step times in ms, process
    peak RSS), all from /proc (Linux)."""
    before = status_kb("VmRSS") * 1024
    if not reset_peak():
        raise OSError("cannot reset the peak-RSS counter (/proc/self/clear_refs); Linux only")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    hwm = status_kb("VmHWM") * 1024
    return max(hwm - before, 0), times, hwm


def profile_trainer(trainer, steps: int = 5, seed: int = 0, warmup: int = 1) -> Profile:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be a non-negative integer, got {warmup!r}")
    if getattr(trainer.backend, "out_of_process", False):
        raise InputError("this bundle's runtime runs in another process (ORT's training bindings in their own "
                         "Python), whose memory this one cannot measure: profile it there")
    b = trainer.bundle
    rng = np.random.default_rng(seed)
    x = rng.random((b.batch_size, *b.input_shape), dtype=np.float32)
    y = rng.integers(0, b.num_classes, b.batch_size).astype(np.int64)
    xs = trainer._x(x)
    lr = trainer.lr_at(trainer.step)
    for _ in range(warmup):
        trainer.backend.train_step(xs, y, lr)
    above, times, hwm = measure_steps(lambda: trainer.backend.train_step(xs, y, lr), steps)
    planned = trainer.backend.planned_bytes()
    measured = above + (planned or 0)
    mem = b.manifest["analytic_memory"]
    resident = mem["frozen_weights_bytes"] + mem["trainable_params_bytes"] + mem["optimizer_state_bytes"]
    if planned is None:  # the batch is the caller's array, resident before the step (a planned arena copies it in)
        resident += mem["input_bytes"]
    step_bytes = mem["analytic_peak_bytes"] - resident
    return Profile(
        model=b.manifest["model"], recipe=b.manifest["recipe"], target=b.target, batch_size=b.batch_size,
        input_shape=list(b.input_shape), steps=steps, warmup=warmup, step_ms_median=float(np.median(times)),
        step_ms_min=float(np.min(times)), step_ms_max=float(np.max(times)),
        analytic_peak_bytes=int(mem["analytic_peak_bytes"]), analytic_step_bytes=int(step_bytes),
        measured_peak_bytes=int(measured), measured_vs_analytic=measured / max(step_bytes, 1),
        planned_bytes=planned, process_peak_bytes=int(hwm),
        breakdown={k: mem[k] for k in ("frozen_weights_bytes", "trainable_params_bytes", "gradients_bytes",
                                       "optimizer_state_bytes", "kept_activations_bytes", "input_bytes",
                                       "transient_peak_bytes")},
    )


def apply_budget(p: Profile, device: str | None = None, budget_mb: float | None = None) -> Profile:
    if device is not None:
        table = devices()
        if device not in table:
            raise InputError(f"unknown device '{device}'; known: {', '.join(table)}")
        spec = table[device]
        p.device, p.counts, budget_mb = device, spec["counts"], spec["budget_mb"]
    elif budget_mb is not None:
        if not budget_mb > 0:
            raise InputError(f"--budget-mb must be > 0, got {budget_mb}")
        p.counts = "process"
    else:
        return p
    p.budget_bytes = int(budget_mb * 2**20)
    need = p.process_peak_bytes if p.counts == "process" else program_bytes(p)
    p.fits = need <= p.budget_bytes
    return p


def program_bytes(p: Profile) -> int:
    """What a microcontroller must hold: weights as stored, params, state and the step's peak."""
    return p.analytic_peak_bytes if p.planned_bytes is None else (
        p.planned_bytes + p.breakdown["frozen_weights_bytes"] + p.breakdown["trainable_params_bytes"]
        + p.breakdown["optimizer_state_bytes"])


def check_plot_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--plot '{path}' is a directory; give a file name, e.g. '{path / 'memory.png'}'")
    return path


def plot_profile(p: Profile, path: str | Path) -> Path:
    """A stacked bar of the analytic breakdown beside the measured peak, with the budget, written
    to exactly `path` (a PNG unless its suffix names another format matplotlib knows)."""
    path = check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed on this device") from None
    mb = 1 / 2**20
    b = p.breakdown
    parts = [("frozen weights", b["frozen_weights_bytes"]), ("trainable params", b["trainable_params_bytes"]),
             ("optimizer state", b["optimizer_state_bytes"]),
             ("kept for backward", b["kept_activations_bytes"]),
             ("other live tensors at peak", max(p.analytic_peak_bytes - b["frozen_weights_bytes"]
                                                - b["trainable_params_bytes"] - b["optimizer_state_bytes"]
                                                - b["kept_activations_bytes"], 0))]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    bottom = 0.0
    colors = ["#4c72b0", "#55a868", "#8172b2", "#c44e52", "#dd8452"]
    for (name, v), c in zip(parts, colors):
        ax.bar(0, v * mb, bottom=bottom, color=c, label=name, width=0.6)
        bottom += v * mb
    resident = sum(v for _, v in parts[:3]) * mb
    ax.bar(1, resident, color="#cccccc", hatch="//", width=0.6, label="resident before the step (as stored)")
    ax.bar(1, p.measured_peak_bytes * mb, bottom=resident, color="#937860", width=0.6,
           label="measured above the pre-step level")
    ax.bar(2, p.process_peak_bytes * mb, color="#8c8c8c", width=0.6, label="measured, whole process")
    if p.budget_bytes:
        ax.axhline(p.budget_bytes * mb, color="black", ls="--", lw=1)
        ax.text(-0.35, p.budget_bytes * mb, f"budget {p.budget_bytes * mb:.4g} MB"
                f"{' (' + p.device + ')' if p.device else ''}", va="bottom", ha="left", fontsize=8)
    ax.set_xticks([0, 1, 2], ["analytic", "measured", "process"])
    ax.set_ylabel("MB")
    ax.set_title(f"{p.model} · {p.recipe} · {p.target} · batch {p.batch_size} · "
                 f"{'x'.join(map(str, p.input_shape[1:]))}\nstep {p.step_ms_median:.1f} ms (median of {p.steps})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fmt = path.suffix[1:].lower() if path.suffix[1:].lower() in fig.canvas.get_supported_filetypes() else "png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: matplotlib appends no suffix to it
            fig.savefig(f, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    return path


def ensure_allocator_env(argv: list[str]) -> None:
    """Re-exec once with glibc returning freed blocks to the system, so RSS follows live memory."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and os.environ.get("EDGETL_NO_REEXEC") is None:
        import sys

        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "EDGETL_NO_REEXEC": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "edgetl.runtime", *argv], env)
