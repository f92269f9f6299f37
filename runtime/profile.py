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

Memory and time come from two separate runs. Memory is measured in a child process with glibc
returning every freed block to the system (MALLOC_MMAP_THRESHOLD_=65536), so RSS follows the live
set; that setting slows allocation-heavy runtimes 2.5-3.5x, so step time is measured in a run with
the default allocator (this process, or a child without the setting if this one has it). The JSON
names the run each figure came from (`memory_run`, `time_run`).

Step time is reported twice: `step_ms_*` is wall time, `step_cpu_ms_*` the process's CPU time over the
step (every thread's; on a machine shared with other work, wall time counts the waits for a core).
Load-time memory: `load_peak_bytes` is the process's peak before the measured steps (imports, loading,
warm-up), `whole_peak_bytes` its peak over its whole life (libraries' code included),
`whole_above_libraries_bytes` that peak above the level once the runtime's libraries were loaded and before
any program, less the library pages first touched after that level (`libraries_paged_in_bytes`:
ExecuTorch's and torch's libraries page in while programs load and run, onnxruntime's at import), so
that no runtime's code counts as its training memory, whenever it is paged in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends.base import Resident, above_libraries, status_kb, threads_from_env
from .errors import InputError

DEVICES_FILE = Path(__file__).with_name("devices.json")


def devices() -> dict[str, dict]:
    return {k: v for k, v in json.loads(DEVICES_FILE.read_text()).items() if not k.startswith("_")}


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
    step_ms_median: float | None  # None when no run with the default allocator was made (see time_run)
    step_ms_min: float | None
    step_ms_max: float | None
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
    ram_bytes: int | None = None  # 'program' devices: what must be in RAM (the weights stay in flash)
    flash_bytes: int | None = None  # 'program' devices: the program files as stored (weights included)
    flash_budget_bytes: int | None = None
    # ExecuTorch: the process peak from the first measured step on, above the runtime's libraries
    # (above_libraries), and the model of it (see analytic_process_bytes)
    process_above_libraries_bytes: int | None = None
    analytic_process_bytes: int | None = None
    memory_run: dict | None = None  # which process and allocator each figure came from
    time_run: dict | None = None
    step_cpu_ms_median: float | None = None  # the process's CPU time over each step (all threads)
    step_cpu_ms_min: float | None = None
    step_cpu_ms_max: float | None = None
    load_peak_bytes: int | None = None  # process peak before the measured steps: imports, loading, warm-up
    whole_peak_bytes: int | None = None  # process peak over its whole life
    whole_above_libraries_bytes: int | None = None  # whole_peak_bytes above the libraries (above_libraries)
    libraries_paged_in_bytes: int | None = None  # library pages first touched after the level before any program
    threads: int | None = None  # $EDGETL_THREADS where set (None: the runtime's default)
    versions: dict | None = None  # the runtime packages that ran the step

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Steps:
    above: int  # peak RSS while the steps ran, above the level just before them
    wall_ms: list[float]
    cpu_ms: list[float]  # the process's CPU time (every thread) over each step
    hwm: int  # process peak from the first measured step on
    load_hwm: int  # process peak before the measured steps (imports, loading, warm-up)


def measure_steps(step, steps: int) -> Steps:
    """Run `step()` `steps` times, measuring memory and time from /proc and the clocks (Linux)."""
    load_hwm = status_kb("VmHWM") * 1024
    before = status_kb("VmRSS") * 1024
    if not reset_peak():
        raise OSError("cannot reset the peak-RSS counter (/proc/self/clear_refs); Linux only")
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    hwm = status_kb("VmHWM") * 1024
    return Steps(max(hwm - before, 0), wall, cpu, hwm, load_hwm)


def versions() -> dict[str, str]:
    """The versions of the runtime packages this process imported (numpy always)."""
    from importlib import metadata

    out = {}
    # the ExecuTorch backend runs the executorch wheel's libraries without importing its Python package
    et_backend = any(m.endswith("runtime.backends.executorch") for m in sys.modules)
    for mod in ("numpy", "onnxruntime", "executorch", "torch", "peft"):
        if mod in sys.modules or (mod == "executorch" and et_backend):
            v = getattr(sys.modules.get(mod), "__version__", None)
            try:
                out[mod] = v or metadata.version(mod)
            except metadata.PackageNotFoundError:
                out[mod] = "unknown"
    return out


def analytic_step_bytes(manifest: dict, planned: int | None) -> int:
    """The analytic model of what `measured_peak_bytes` measures, from the manifest.

    A runtime with a planned arena (ExecuTorch): that plan, which its exporter computed from the
    step's program (every tensor the program creates outside XNNPACK's delegates, at the offsets
    the planner gave them), plus the host's copy of the step's outputs (the backend copies them out
    of the arena, which the next call reuses, while the old parameters and state are still held:
    the new parameters, optimizer state, logits and loss; `full` on mnist_cnn: 3.1 MB beside a
    12-14 MB plan). What the runtime allocates outside it is resident before the measured
    step and so in neither figure: XNNPACK's packed weights (load) and its workspace for values
    inside a delegate call (the first step; see BENCHMARKS.md, the ExecuTorch whole-process
    breakdown). Otherwise: edgetl's lean-step model (the live set over the step's schedule) less
    what is resident before the step."""
    mem = manifest["analytic_memory"]
    plan = manifest.get("executorch", {}).get("planned_bytes")
    if planned is not None and plan is not None:
        return int(plan) + host_output_bytes(manifest)
    resident = mem["frozen_weights_bytes"] + mem["trainable_params_bytes"] + mem["optimizer_state_bytes"]
    if planned is None:  # the batch is the caller's array, resident before the step (a planned arena copies it in)
        resident += mem["input_bytes"]
    return int(mem["analytic_peak_bytes"] - resident)


def host_output_bytes(manifest: dict) -> int:
    """The bytes of a train step's outputs as the host receives them: the new trainable parameters and
    optimizer state, the logits (batch x classes, fp32) and the loss."""
    mem = manifest["analytic_memory"]
    logits = 4 * int(mem["batch_size"]) * int(manifest["num_classes"])
    return int(mem["trainable_params_bytes"] + mem["optimizer_state_bytes"] + logits + 4)


def analytic_process_bytes(manifest: dict) -> int | None:
    """ExecuTorch's whole process above its libraries, modelled from the manifest: the step's plan,
    what XNNPACK allocates outside it (its packed copy of the frozen weights, its workspace sized
    for the delegate call with the most inner values; both recorded by the exporter), the
    parameters, the optimizer state and the caller's batch. Not modelled: XNNPACK's per-operator
    buffers (indirection buffers), the program bytes ExecuTorch still holds, the allocator's slack."""
    et = manifest.get("executorch", {})
    if "xnnpack_workspace_bytes" not in et:
        return None
    mem = manifest["analytic_memory"]
    return int(et["planned_bytes"] + et["xnnpack_workspace_bytes"] + et["xnnpack_packed_weights_bytes"]
               + mem["trainable_params_bytes"] + mem["optimizer_state_bytes"] + mem["input_bytes"])


def check_profilable(trainer, steps: int, warmup: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be a non-negative integer, got {warmup!r}")
    if getattr(trainer.backend, "out_of_process", False):
        raise InputError("this bundle's runtime runs in another process (ORT's training bindings in their own "
                         "Python), whose memory this one cannot measure: profile it there")


def profile_trainer(trainer, steps: int = 5, seed: int = 0, warmup: int = 1) -> Profile:
    """Memory and step time of one run in this process, as it is set up (see `label_run`)."""
    check_profilable(trainer, steps, warmup)
    b = trainer.bundle
    rng = np.random.default_rng(seed)
    x = rng.random((b.batch_size, *b.input_shape), dtype=np.float32)
    y = rng.integers(0, b.num_classes, b.batch_size).astype(np.int64)
    lr, step, state = trainer.lr_at(trainer.step), trainer.step, trainer.get_state()
    # The batch normalized once, before the measured steps, as fit feeds it (fit normalizes the data
    # set up front); train_step would normalize a new copy inside each step, which fit never pays for.
    # check=False: the step as the device runs it, without the divergence guard's copy of the state.
    x, y = trainer._xy(x, y)
    for _ in range(warmup):
        trainer._train_step(x, y, lr, check=False)
    m = measure_steps(lambda: trainer._train_step(x, y, lr, check=False), steps)
    above, times, hwm = m.above, m.wall_ms, m.hwm
    trainer.set_state(state)  # profiling leaves the trainer as it was
    trainer.step = step
    planned = trainer.backend.planned_bytes()
    before, after = getattr(trainer.backend, "before_programs", None), Resident.now()
    known = before is not None and after is not None
    measured = above + (planned or 0)
    mem = b.manifest["analytic_memory"]
    step_bytes = analytic_step_bytes(b.manifest, planned)
    return Profile(
        model=b.manifest["model"], recipe=b.manifest["recipe"], target=b.target, batch_size=b.batch_size,
        input_shape=list(b.input_shape), steps=steps, warmup=warmup, step_ms_median=float(np.median(times)),
        step_ms_min=float(np.min(times)), step_ms_max=float(np.max(times)),
        analytic_peak_bytes=int(mem["analytic_peak_bytes"]), analytic_step_bytes=int(step_bytes),
        measured_peak_bytes=int(measured), measured_vs_analytic=measured / max(step_bytes, 1),
        planned_bytes=planned, process_peak_bytes=int(hwm),
        process_above_libraries_bytes=above_libraries(hwm, before, after) if known else None,
        analytic_process_bytes=analytic_process_bytes(b.manifest),
        step_cpu_ms_median=float(np.median(m.cpu_ms)), step_cpu_ms_min=float(np.min(m.cpu_ms)),
        step_cpu_ms_max=float(np.max(m.cpu_ms)), load_peak_bytes=int(m.load_hwm),
        whole_peak_bytes=int(max(m.load_hwm, hwm)),
        whole_above_libraries_bytes=above_libraries(max(m.load_hwm, hwm), before, after) if known else None,
        libraries_paged_in_bytes=max(after.libraries - before.libraries, 0) if known else None,
        threads=threads_from_env(), versions=versions(),
        breakdown={k: mem[k] for k in ("frozen_weights_bytes", "trainable_params_bytes", "gradients_bytes",
                                       "optimizer_state_bytes", "kept_activations_bytes", "input_bytes",
                                       "transient_peak_bytes")},
    )


def resolve_budget(device: str | None = None, budget_mb: float | None = None) -> dict | None:
    """The budget a profile is checked against: {device, counts, budget_mb, flash_mb}, or None."""
    if device is not None:
        table = devices()
        if device not in table:
            raise InputError(f"unknown device '{device}'; known: {', '.join(table)}")
        spec = table[device]
        return {"device": device, "counts": spec["counts"], "budget_mb": spec["budget_mb"],
                "flash_mb": spec.get("flash_mb")}
    if budget_mb is not None:
        if not budget_mb > 0:
            raise InputError(f"--budget-mb must be > 0, got {budget_mb}")
        return {"device": None, "counts": "process", "budget_mb": budget_mb, "flash_mb": None}
    return None


def apply_budget(p: Profile, device: str | None = None, budget_mb: float | None = None,
                 flash_bytes: int | None = None) -> Profile:
    """Check `p` against a device's budget. On 'program' devices (microcontrollers) RAM and flash
    are separate: the weights stay in flash (`flash_bytes`, the program files as stored), and RAM
    holds the step's arena, the parameters and the optimizer state."""
    spec = resolve_budget(device, budget_mb)
    if spec is None:
        return p
    p.device, p.counts = spec["device"], spec["counts"]
    p.budget_bytes = int(spec["budget_mb"] * 2**20)
    if p.counts == "process":
        p.fits = p.process_peak_bytes <= p.budget_bytes
        return p
    p.ram_bytes = program_bytes(p) - p.breakdown["frozen_weights_bytes"]
    p.flash_bytes = flash_bytes
    p.fits = p.ram_bytes <= p.budget_bytes
    if spec["flash_mb"] is not None:
        p.flash_budget_bytes = int(spec["flash_mb"] * 2**20)
        p.fits = p.fits and flash_bytes is not None and flash_bytes <= p.flash_budget_bytes
    return p


def program_bytes(p: Profile) -> int:
    """What a microcontroller must hold: weights as stored, params, state and the step's peak."""
    return p.analytic_peak_bytes if p.planned_bytes is None else (
        p.planned_bytes + p.breakdown["frozen_weights_bytes"] + p.breakdown["trainable_params_bytes"]
        + p.breakdown["optimizer_state_bytes"])


def program_files_bytes(bundle) -> int:
    """The bundle's program files as stored: what a microcontroller keeps in flash."""
    return sum((bundle.root / name).stat().st_size for name in bundle.manifest["programs"].values())


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
                 f"{'x'.join(map(str, p.input_shape[1:]))}\n"
                 + (f"step {p.step_ms_median:.1f} ms (median of {p.steps}, default allocator)"
                    if p.step_ms_median is not None else "step time not measured"),
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


MEMORY_SETTING = {"MALLOC_MMAP_THRESHOLD_": "65536"}
PART_VAR = "EDGETL_PROFILE_PART"  # set in the child runs: "memory" or "time"


def allocator(env: dict | None = None) -> str:
    """How glibc's allocator is set in `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    set_ = [f"{k}={env[k]}" for k in sorted(env) if k.startswith("MALLOC_")]
    if "malloc" in env.get("GLIBC_TUNABLES", ""):
        set_.append(f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}")
    return " ".join(set_) or "default"


def default_allocator_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def child_command(runtime_argv: list[str] | None) -> list[str]:
    """The command that started this device CLI, with its own arguments left off: so a child run
    starts the same way (`python -m edgetl.runtime`, or the ort-training peer's boot line)."""
    orig = list(getattr(sys, "orig_argv", []))
    if runtime_argv is None:
        runtime_argv = sys.argv[1:]
    n = len(runtime_argv)
    if orig and n and orig[-n:] == list(runtime_argv) and len(orig) > n:
        return [sys.executable, *orig[1:-n]]
    return [sys.executable, "-m", "edgetl.runtime"]


def run_part(part: str, prefix: list[str], args: list[str], env: dict) -> dict:
    """One profile run in a child process; its JSON, or an error naming the run."""
    from .errors import EdgeRuntimeError

    r = subprocess.run([*prefix, "profile", *args, "--json"], capture_output=True, text=True,
                       env={**env, PART_VAR: part})
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise EdgeRuntimeError(f"the {part} run failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


MEMORY_FIELDS = ("analytic_peak_bytes", "analytic_step_bytes", "measured_peak_bytes", "measured_vs_analytic",
                 "planned_bytes", "process_peak_bytes", "process_above_libraries_bytes", "analytic_process_bytes",
                 "breakdown", "memory_run", "load_peak_bytes", "whole_peak_bytes", "whole_above_libraries_bytes",
                 "libraries_paged_in_bytes")
TIME_FIELDS = ("step_ms_median", "step_ms_min", "step_ms_max", "step_cpu_ms_median", "step_cpu_ms_min",
               "step_cpu_ms_max", "time_run")


def with_memory_from(p: Profile, memory: dict) -> Profile:
    for k in MEMORY_FIELDS:
        setattr(p, k, memory[k])
    return p


def label_run(p: Profile, part: str | None, process: str) -> Profile:
    """Name the run this process made (`part`: "memory", "time" or None for both); a figure from a
    run with the memory setting is not reported as a step time."""
    here = {"process": process, "allocator": allocator()}
    if part in (None, "memory"):
        p.memory_run = here
    if part in (None, "time"):
        p.time_run = here
    if here["allocator"] != "default" and part != "memory":
        p.step_ms_median = p.step_ms_min = p.step_ms_max = None
        p.step_cpu_ms_median = p.step_cpu_ms_min = p.step_cpu_ms_max = None
        p.time_run = {**here, "note": f"no step time: this run has {here['allocator']}, which slows allocation; "
                                      "step time comes only from a run with the default allocator"}
    return p
