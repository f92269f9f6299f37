"""Analytic memory of one lean training step.

The step's own schedule is replayed on meta tensors (no data, no compute) with a tracker that
counts every tensor the schedule holds: flowing activations (freed after their last use), what
each rule keeps for backward (freed after that layer's backward), flowing gradients, the float
copy of a frozen weight while one op uses it, parameter gradients and the updated parameters
and optimizer state. The peak of that live set, plus what is resident for the whole step (frozen
weights as stored, parameters, optimizer state, the batch), is the analytic peak.

Conventions, compared with TinyTL's profiler: frozen weights count at 8 bits (int8) plus one fp32
scale per output channel; activation masks count at the bytes really stored (bool: 8 bits per
element; TinyTL counts 1 bit); Hard-Swish without the mask modifier keeps its fp32 input, as in
TinyTL. Unlike TinyTL we count the live set over the whole schedule, not only what is kept.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .kept_kinds import KINDS, kept_kind
from .lowering import PINNED, Lowering
from .optim import MICRO_STEP, OptimizerConfig
from .program import Program, cross_entropy_with_grad
from .recipes.side import backbone_first

Tensor = torch.Tensor


def _sid(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class Tracker:
    """Counts live bytes per storage. A storage lives while the program holds it by name
    (`hold`) or while any tensor object made by an op still refers to it (observed through a
    dispatch mode): so temporaries inside a rule count for exactly as long as they exist.
    Views count as their base's storage; rules copy (`clone`) where an exported program copies
    and a view would otherwise keep a larger base alive (e.g. a crop after a transposed conv)."""

    def __init__(self):
        self.holders: dict[str, int] = {}
        self.storages: dict[int, dict] = {}
        self.live = 0
        self.peak = 0
        self.peak_at = ""
        self.peak_by_kind: dict[str, int] = {}
        self.where = "start"

    def _entry(self, sid: int, nbytes: int, kind: str) -> dict:
        e = self.storages.get(sid)
        if e is None:
            e = self.storages[sid] = {"bytes": nbytes, "kind": kind, "holders": 0, "objects": 0, "ref": None}
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_at = self.live, self.where
                self.peak_by_kind = {}
                for v in self.storages.values():
                    self.peak_by_kind[v["kind"]] = self.peak_by_kind.get(v["kind"], 0) + v["bytes"]
        return e

    def _maybe_free(self, sid: int) -> None:
        e = self.storages.get(sid)
        if e is not None and e["holders"] == 0 and e["objects"] == 0:
            self.live -= e["bytes"]
            del self.storages[sid]

    def hold(self, key: str, t: Tensor, kind: str = "") -> None:
        if key in self.holders:
            self.release(key)
        sid = _sid(t)
        self.where = key
        e = self._entry(sid, t.untyped_storage().nbytes(), kind)
        if e["kind"] == "temporaries" and kind:
            e["kind"] = kind
        e["holders"] += 1
        e["ref"] = t
        self.holders[key] = sid

    def release(self, key: str) -> None:
        sid = self.holders.pop(key, None)
        if sid is None:
            return
        e = self.storages[sid]
        e["holders"] -= 1
        if e["holders"] == 0:
            e["ref"] = None
        self._maybe_free(sid)

    def observe(self, t: Tensor) -> None:
        """A tensor an op just returned: its storage lives at least as long as the object."""
        sid = _sid(t)
        e = self._entry(sid, t.untyped_storage().nbytes(), "temporaries")
        e["objects"] += 1
        weakref.finalize(t, self._gone, sid)

    def _gone(self, sid: int) -> None:
        e = self.storages.get(sid)
        if e is not None:
            e["objects"] -= 1
            self._maybe_free(sid)


def _ort_where_selections(func, args) -> list[Tensor]:
    """onnxruntime's CPU Where allocates two selections before its output, `cond ? X : 0` and
    `cond ? 0 : Y`, each broadcast over the condition and its value, and merges them (where_op.cc):
    three output sizes at once where torch makes one. Measured: the max pool's running max
    (ResNet-18-like stem, Where of 2 taps) held 3 x 256 KB for each Where."""
    if func.overloadpacket is not torch.ops.aten.where or len(args) != 3:
        return []
    cond, a, b = args
    dtype = next((t.dtype for t in (a, b) if isinstance(t, Tensor) and t.dim()), None)
    if dtype is None:
        dtype = a.dtype if isinstance(a, Tensor) else b.dtype if isinstance(b, Tensor) else torch.float32
    def shape(v):
        return torch.broadcast_shapes(cond.shape, v.shape if isinstance(v, Tensor) else ())
    return [torch.empty(shape(v), dtype=dtype, device=cond.device) for v in (a, b)]


class _Observe(TorchDispatchMode):
    """Observes every tensor an op makes. `ort_kernels`: also what onnxruntime's CPU kernels
    allocate inside an op beside its output (the replay of the onnx target's schedule)."""

    def __init__(self, tracker: Tracker, ort_kernels: bool = False):
        super().__init__()
        self.tracker = tracker
        self.ort_kernels = ort_kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inner = _ort_where_selections(func, args) if self.ort_kernels else []
        for t in inner:  # made inside the dispatch, where this mode is off: observed by hand
            self.tracker.observe(t)
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.tracker.observe(t)  # views share their base's storage, so they count once
        inner = t = None  # the kernel's own temporaries die once its output exists
        return out


@dataclass
class KeptTensor:
    node: str
    layer: str
    name: str
    shape: list[int]
    dtype: str
    bits: int
    bytes: int
    kind: str = ""  # what it is for (edgetl.kept_kinds): attention probabilities, LoRA inputs, ...


@dataclass
class MemoryReport:
    batch_size: int
    frozen_weights_bytes: int
    trainable_params_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    kept_activations_bytes: int
    transient_peak_bytes: int
    analytic_peak_bytes: int
    peak_at: str
    peak_by_kind: dict[str, int]
    kept: list[KeptTensor] = field(default_factory=list)
    kept_by_kind: dict[str, int] = field(default_factory=dict)  # kept bytes by kept_kinds kind, shared storage once

    def breakdown(self) -> dict:
        d = asdict(self)
        d["kept"] = [asdict(k) for k in self.kept]
        return d


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def analyze(prepared, batch_size: int, optimizer: OptimizerConfig | None = None,
            lowering: Lowering | None = None) -> MemoryReport:
    """One step's memory as the step lowered by `lowering` holds it (default: the onnx target's
    schedule); what depends on the target: masks applied with or without a float copy, frozen
    weights dequantized whole or by row blocks.

    Every int8 frozen weight counts as a transient fp32 copy where it is used, also those ExecuTorch's XNNPACK
    reads as int8 (`Lowering.int8_linear_weights`: packed at load, outside the step). That overcounts only where
    the peak falls at such a layer (mnist_cnn at batch 1: its fc, 1.1 MiB); at mnist_cnn b32 and Lite0 224 b8
    (bias+mask) the peak is at the first convs and the figures are the same with the int8 weights given to the
    rules (task Q2). ExecuTorch's measured / analytic compares its plan instead (runtime/profile.py
    `analytic_step_bytes`)."""
    optimizer = optimizer or OptimizerConfig()
    meta = torch.device("meta")
    x = torch.empty(batch_size, *prepared.graph.input_shape, device=meta)
    y = torch.empty(batch_size, dtype=torch.int64, device=meta)
    params = {t: v.to(meta) for t, v in prepared.initial_params().items()}
    state = {k: v.to(meta) for k, v in optimizer.init_state(prepared.initial_params()).items()}
    shapes = {name: t.shape for name, t in prepared.graph.tensors.items()}
    def frozen(name: str, zero=None, rows: tuple[int, int] | None = None) -> Tensor:
        shape = shapes[name] if rows is None else (rows[1] - rows[0], *shapes[name][1:])
        return torch.empty(shape, device=meta)

    lowering = lowering or PINNED
    # onnxruntime runs a side-tuned step's backbone to its end before the ladder (`backbone_first`)
    order = backbone_first(prepared.graph) if lowering.pin_schedule and "side" in prepared.notes else None
    program = Program(prepared.graph, frozen, lowering, replay=True, order=order)
    tracker = Tracker()
    # The batch is resident for the whole step (input_bytes, below); a rule that keeps it for its
    # backward (the first layer's weight gradient keeps x) holds the same storage, counted once.
    tracker.hold("input:x", x, "input")
    tracker.hold("input:y", y, "input")
    with _Observe(tracker, ort_kernels=program.lowering.pin_schedule):
        peak, peak_at, by_kind, kept_list, kept_bytes, kept_by_kind = _replay(
            prepared, program, optimizer, x, y, params, state, tracker)
    static = {
        "frozen": sum(_nbytes(s) for stored in prepared.stored.values() for s in stored),
        "params": sum(_nbytes(v) for v in params.values()),
        "state": sum(_nbytes(v) for v in state.values()),
        "input": _nbytes(x) + _nbytes(y),
    }
    return MemoryReport(
        batch_size=batch_size,
        frozen_weights_bytes=static["frozen"],
        trainable_params_bytes=static["params"],
        gradients_bytes=static["params"],
        optimizer_state_bytes=static["state"],
        input_bytes=static["input"],
        kept_activations_bytes=kept_bytes,
        transient_peak_bytes=peak - static["input"],
        analytic_peak_bytes=sum(static.values()) + peak - static["input"],
        peak_at=peak_at,
        peak_by_kind={k: v for k, v in by_kind.items() if k != "input"},  # the batch: input_bytes
        kept=kept_list,
        kept_by_kind=kept_by_kind,
    )


def _replay(prepared, program, optimizer, x, y, params, state, tracker):
    """One step on meta tensors, as the program schedules it; returns the tracker's findings."""
    logits, kept = program.forward(x, params, True, tracker)
    kept_list, kept_storages, kept_by_kind = [], {}, dict.fromkeys(KINDS, 0)
    for node, tensors in kept.items():
        layer = prepared.graph.node(node).rule.describe()
        for name, t in tensors.items():
            kind = kept_kind(prepared.graph, node, name)
            kept_list.append(KeptTensor(node, layer, name, list(t.shape), str(t.dtype).replace("torch.", ""),
                                        t.element_size() * 8, _nbytes(t), kind))
            if _sid(t) not in kept_storages:  # a tensor two rules keep (softmax's p, the next matmul's a) once
                kept_by_kind[kind] += t.untyped_storage().nbytes()
            kept_storages[_sid(t)] = t.untyped_storage().nbytes()
        del tensors
    kept_bytes = sum(kept_storages.values())
    t = None  # the loop variables must not keep a kept tensor alive
    tracker.hold("logits", logits, "activations (flowing)")
    loss, g = cross_entropy_with_grad(logits, y)
    lr = torch.empty((), device=logits.device)

    def update(t: str, grad: Tensor) -> None:
        new_p, new_s = optimizer.update({t: params[t]}, {t: grad}, _state_of(optimizer, state, t), lr)
        for k, v in {**new_p, **new_s}.items():
            tracker.hold(f"new:{k}", v, "updated params and state")
        tracker.release(f"pgrad:{t}")

    # onnxruntime's schedule (a pinned lowering) updates each parameter as soon as its gradient exists:
    # the new parameter and state (outputs, alive to the end) replace the gradient mid-backward. A
    # step run as written (eager, ExecuTorch) updates after the backward, consuming the gradients.
    early = program.lowering.pin_schedule
    grads = program.backward(g, kept, params, tracker, on_param_grad=update if early else None)
    del g
    tracker.release("logits")
    for t in prepared.trainable if not early else ():
        update(t, grads[t])
    kept_by_kind = {k: v for k, v in kept_by_kind.items() if v}
    return tracker.peak, tracker.peak_at, tracker.peak_by_kind, kept_list, kept_bytes, kept_by_kind


def _state_of(optimizer: OptimizerConfig, state: dict[str, Tensor], t: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.endswith(f":{t}") or k in ("step", MICRO_STEP)}
