"""`edgetl plan --device NAME`: the recipe, batch and input size with the most trainable capacity
that fits a device's training budget, from the analytic memory model alone (nothing is trained).

A small grid is tried (recipes x batches x input sizes); each model and input shape is traced once.
What a candidate needs is compared with the device's budget as `runtime/devices.json` counts it:
- 'process' devices (phones, boards): the whole process must fit, so the analytic peak plus the
  runtime's own resident memory (its libraries, measured once per runtime: `_runtime_base_mb`).
- 'program' devices (microcontrollers): RAM holds the step (analytic peak minus the frozen
  weights) and flash holds the frozen weights (int8 plus per-channel scales); each has its budget.
  Their step dequantizes large frozen weights in row blocks (`weight_block_bytes`: 1/16 of the
  RAM budget), not whole, so no fp32 copy of a whole weight is in RAM; export with the same.
Micro-batches, on targets whose spec takes them (`TargetSpec.micro_batches`): where a batch's whole
step does not fit, its micro-batches m (divisors of the batch, largest first) are tried: the step of
`export(..., micro_batch=m)` holds m samples' activations plus one gradient accumulator per trainable
(counted as optimizer state). Memory then hardly depends on the batch, so among candidates that fit,
more samples per call (faster) wins before a larger batch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field

from .errors import EdgeTLError
from .runtime.profile import DEVICES_FILE, resolve_budget
from .runtime.targets import target_spec

RECIPES = ("bias+mask", "side+mask", "bias", "head", "full", "bias+last2")
BATCHES = (1, 2, 4, 8, 16)
SIZE_FRACTIONS = (1.0, 0.75, 0.5)
SKIPPED = "not analysed: fewer trainable params or a smaller input than a candidate that fits"
MICRO_BATCH_TRIED = ("where a batch's whole step does not fit, its micro-batches (divisors of the batch, largest "
                     "first) are tried: `edgetl export --micro-batch M` runs a batch as calls of M samples, gradients "
                     "accumulated, so the step holds M samples' activations")


def micro_batch_refused(target: str) -> str:
    return f"not considered: the {target} target's step takes whole batches"


@dataclass
class Candidate:
    recipe: str
    batch: int | None
    input_shape: list[int]
    trainable_params: int | None = None
    micro_batch: int | None = None  # samples per call of the step, gradients accumulated; None: the whole batch
    planned_bytes: int | None = None  # analytic peak of the whole step (weights as stored included)
    ram_bytes: int | None = None  # what is checked against the RAM/process budget
    flash_bytes: int | None = None  # 'program' devices: frozen weights as stored
    fits: bool = False
    reason: str = ""
    peak_at: str = ""
    largest_part: str = ""  # the biggest kind of tensor live at the peak


@dataclass
class Plan:
    model: str
    device: str | None
    counts: str
    target: str
    budget_bytes: int
    flash_budget_bytes: int | None
    runtime_base_bytes: int | None  # 'process' devices: the runtime's own memory, added to each candidate
    chosen: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    weight_block_bytes: int | None = None  # 'program' devices: frozen weights dequantized in row blocks this size
    micro_batch: int | None = None  # the proposal's (None: its whole batch in one call)
    micro_batch_note: str = MICRO_BATCH_TRIED
    nothing_fits: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def runtime_base_bytes(target: str) -> int | None:
    base = json.loads(DEVICES_FILE.read_text()).get("_runtime_base_mb", {}).get(target)
    return None if base is None else int(base * 2**20)


def candidate_shapes(default: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The model's input shape and, for square images, a few smaller sides (multiples of 4)."""
    if len(default) != 3 or default[1] != default[2]:
        return [tuple(default)]
    sides = dict.fromkeys(max(4, int(round(default[1] * f / 4)) * 4) if f < 1 else default[1]
                          for f in SIZE_FRACTIONS)
    return [(default[0], s, s) for s in sides]


def program_block_bytes(budget: int) -> int:
    """The row-block size of frozen-weight dequantization on a 'program' device with RAM `budget`:
    1/16 of it (16 KB at 256 KB), so the transient fp32 weight is small beside the rest of the step."""
    return max(1024, budget // 16)


def samples_per_call(c: Candidate) -> int:
    return c.micro_batch or c.batch


def _rank(c: Candidate) -> tuple:
    """Most trainable params, then the largest input, then the most samples per call (the fastest),
    then the largest batch."""
    return c.trainable_params, c.input_shape[1:], samples_per_call(c), c.batch


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _judge(c: Candidate, mem, counts: str, budget: int, flash_budget: int | None, base: int | None) -> None:
    c.planned_bytes = int(mem.analytic_peak_bytes)
    c.peak_at = mem.peak_at
    kind, size = max(mem.peak_by_kind.items(), key=lambda kv: kv[1], default=("", 0))
    c.largest_part = f"{kind} {_human(size)}" if kind else ""
    if counts == "program":
        c.ram_bytes = int(mem.analytic_peak_bytes - mem.frozen_weights_bytes)
        c.flash_bytes = int(mem.frozen_weights_bytes)
        over = []
        if c.ram_bytes > budget:
            over.append(f"RAM {_human(c.ram_bytes)} is {_human(c.ram_bytes - budget)} over {_human(budget)}"
                        f" (largest at the peak: {c.largest_part})")
        if flash_budget is not None and c.flash_bytes > flash_budget:
            over.append(f"flash {_human(c.flash_bytes)} is {_human(c.flash_bytes - flash_budget)} over "
                        f"{_human(flash_budget)}")
        c.fits, c.reason = not over, "; ".join(over) or "fits"
        return
    c.ram_bytes = c.planned_bytes + (base or 0)
    c.fits = c.ram_bytes <= budget
    with_base = f" with the runtime's {_human(base)}" if base else ""
    c.reason = "fits" if c.fits else (f"{_human(c.ram_bytes)}{with_base} is {_human(c.ram_bytes - budget)} over "
                                      f"{_human(budget)}")


def plan(model: str, num_classes: int = 10, device: str | None = None, budget_mb: float | None = None,
         target: str | None = None, recipes: list[str] | None = None, batches: list[int] | None = None,
         input_shapes: list[tuple[int, ...]] | None = None, optimizer=None, head: str | None = None,
         input_size: int | None = None, weight_block_bytes: int | None = None) -> Plan:
    """Try the grid and pick the candidate with the most trainable parameters that fits (ties: the
    larger input, then more samples per call, then the larger batch; `_rank`); where the target takes
    micro-batches, a batch that does not fit whole is tried at its micro-batches. `input_shapes` None:
    the model's own and a few smaller.
    `weight_block_bytes`: the step's frozen-weight row blocks (default: 'program' devices' own)."""
    from .backbones import load_backbone
    from .exporters import lowering as target_lowering
    from .optim import OptimizerConfig
    from .prepared import prepare

    if device is None and budget_mb is None:
        raise EdgeTLError("give --device NAME or --budget-mb N to plan against")
    spec = resolve_budget(device, budget_mb)
    from .runtime.profile import devices

    target = target or (devices()[device]["runtime"] if device else "onnx")
    counts = spec["counts"]
    budget = int(spec["budget_mb"] * 2**20)
    flash = None if spec["flash_mb"] is None else int(spec["flash_mb"] * 2**20)
    base = runtime_base_bytes(target) if counts == "process" else None
    block = weight_block_bytes or (program_block_bytes(budget) if counts == "program" else None)
    lowering = target_lowering(target, block)  # the memory the target's step holds
    takes_micro = target_spec(target).micro_batches
    if optimizer is None:
        optimizer = OptimizerConfig.make("sgd", None, momentum=0.9 if target_spec(target).sgd_momentum else 0.0)

    def judge(c: Candidate, mem) -> None:
        _judge(c, mem, counts, budget, flash, base)

    bb = load_backbone(model)
    if input_size is not None:
        input_shapes = [(bb.in_channels, input_size, input_size)]
    shapes = input_shapes or candidate_shapes(tuple(bb.input_shape or (bb.in_channels, bb.input_size,
                                                                        bb.input_size)))
    traced: dict = {}
    out: list[Candidate] = []
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a size the model cannot take is a row in the table, not a traceback
    batches = sorted(batches or BATCHES)
    try:
        prepared: dict = {}  # (recipe, shape) -> PreparedModel, or None where it cannot be prepared
        bad_shapes: set = set()

        def get(recipe, shape):
            if (recipe, shape) not in prepared:
                try:
                    prepared[(recipe, shape)] = prepare(bb, recipe, num_classes, input_shape=shape, head=head,
                                                        traced=traced)
                except EdgeTLError as e:
                    prepared[(recipe, shape)] = None
                    if "too small" in str(e):  # the size, not the recipe: one row for all recipes
                        if shape not in bad_shapes:
                            out.append(Candidate("(any)", None, list(shape), reason=f"cannot prepare: {e}"))
                        bad_shapes.add(shape)
                    else:
                        out.append(Candidate(recipe, None, list(shape), reason=f"cannot prepare: {e}"))
            return prepared[(recipe, shape)]

        # most trainable parameters first, so groups that cannot beat a fitting one are checked at batch 1 only
        params = {r: pm.summary()["trainable_params"] for r in dict.fromkeys(recipes or RECIPES)
                  if (pm := get(r, shapes[0])) is not None}
        best = None  # the best fitting candidate so far
        for recipe in sorted(params, key=lambda r: -params[r]):
            for shape in shapes:
                pm = None if shape in bad_shapes else get(recipe, shape)
                prepared.pop((recipe, shape), None)  # each prepared model is used for one group only
                if pm is None:
                    continue
                trainable = pm.summary()["trainable_params"]
                hopeless = best is not None and (trainable, list(shape[1:])) < _rank(best)[:2]
                too_big_at = None
                micro = _Micro(pm, optimizer, lowering, judge, out) if takes_micro else None
                for b in batches:
                    c = Candidate(recipe, b, list(shape), trainable)
                    if hopeless and b != batches[0]:
                        c.reason = SKIPPED
                        out.append(c)
                        continue
                    if too_big_at is not None:  # memory grows with the batch
                        c.reason = f"batch {too_big_at} already does not fit"
                    else:
                        judge(c, pm.memory(b, optimizer, lowering))
                        if not c.fits:
                            too_big_at = b
                    out.append(c)
                    if not c.fits and micro is not None:  # its largest micro-batch that fits, if any
                        c = micro.largest_fitting(c, too_big_at)
                    if c.fits and (best is None or _rank(c) > _rank(best)):
                        best = c
    finally:
        quiet.setLevel(level)
    fitting = [c for c in out if c.fits]
    chosen = max(fitting, key=_rank, default=None)
    if chosen is not None:
        for c in fitting:
            if c is chosen:
                continue
            if c.trainable_params < chosen.trainable_params:
                c.reason = "fits; fewer trainable params than the proposal"
            elif c.input_shape[1:] < chosen.input_shape[1:]:
                c.reason = "fits; smaller input than the proposal"
            elif samples_per_call(c) < samples_per_call(chosen):
                c.reason = "fits; fewer samples per call (slower) than the proposal"
            elif c.batch < chosen.batch:
                c.reason = "fits; smaller batch than the proposal"
            else:
                c.reason = "fits; as much capacity as the proposal, listed after it"
    p = Plan(bb.name, device, counts, target, budget, flash, base, chosen, out, weight_block_bytes=block,
             micro_batch=chosen.micro_batch if chosen else None,
             micro_batch_note=MICRO_BATCH_TRIED if takes_micro else micro_batch_refused(target))
    if chosen is None:
        judged = [c for c in out if c.ram_bytes is not None]
        least = min(judged, key=lambda c: c.ram_bytes, default=None)
        where = f"{device} ({_human(budget)})" if device else _human(budget)
        p.nothing_fits = (f"nothing fits {where}: the smallest, {least.recipe} batch {least.batch}"
                          f"{_micro_text(least)} {'×'.join(map(str, least.input_shape))}, {least.reason}" if least else
                          f"nothing fits {where}: no candidate could be prepared")
    return p


def _micro_text(c: Candidate) -> str:
    return f" (micro-batch {c.micro_batch})" if c.micro_batch else ""


class _Micro:
    """One group's (recipe, input) micro-batches. The step at micro-batch m holds the same whatever
    the batch it accumulates (m samples, one accumulator per trainable), so each m is analysed once
    and its row shown once where it does not fit."""

    def __init__(self, pm, optimizer, lowering, judge, out: list[Candidate]):
        self.pm, self.optimizer, self.lowering, self.judge, self.out = pm, optimizer, lowering, judge, out
        self.judged: dict[int, Candidate] = {}
        self.refused: str | None = None

    def largest_fitting(self, whole: Candidate, too_big_at: int) -> Candidate:
        """The row of `whole`'s batch at its largest micro-batch that fits (appended), or `whole`.
        Micro-batches of at least `too_big_at` samples cannot fit: their step holds more than that
        whole batch's."""
        from .micro_batch import accumulating

        b = whole.batch
        if self.refused:
            return whole
        for m in sorted((d for d in range(1, min(b, too_big_at)) if b % d == 0), reverse=True):
            if m not in self.judged:
                c = dataclasses.replace(whole, micro_batch=m, reason="")
                try:
                    opt = accumulating(self.pm, self.optimizer, b, m)
                except EdgeTLError as e:  # e.g. a rule with batch statistics: no micro-batch equals the batch
                    self.refused = c.reason = f"micro-batches refused: {e}"
                    self.out.append(c)
                    return whole
                self.judge(c, self.pm.memory(m, opt, self.lowering))
                self.judged[m] = c
                if not c.fits:
                    self.out.append(c)
            if self.judged[m].fits:
                c = dataclasses.replace(self.judged[m], batch=b)
                self.out.append(c)
                return c
        return whole


def render(p: Plan) -> str:
    """The proposal and the table of every candidate."""
    where = p.device or "the given budget"
    if p.counts == "program":
        limits = f"RAM {_human(p.budget_bytes)} for the step" + (
            f", flash {_human(p.flash_budget_bytes)} for the weights" if p.flash_budget_bytes else "")
    else:
        limits = f"{_human(p.budget_bytes)} for the whole process" + (
            f" (the {p.target} runtime itself: {_human(p.runtime_base_bytes)})" if p.runtime_base_bytes else
            " (the runtime's own memory is not included: not measured for this target)")
    lines = [f"edgetl plan: {p.model} on {where}: {limits}; target {p.target}"]
    c = p.chosen
    if c is None:
        lines.append(p.nothing_fits)
    else:
        flash = f", flash {_human(c.flash_bytes)}" if c.flash_bytes is not None else ""
        micro = (f" in micro-batches of {c.micro_batch} (export with --micro-batch {c.micro_batch})"
                 if c.micro_batch else "")
        lines.append(f"proposal: recipe {c.recipe}, batch {c.batch}{micro}, input {'×'.join(map(str, c.input_shape))}: "
                     f"{c.trainable_params:,} trainable params, needs {_human(c.ram_bytes)}{flash}")
    if p.weight_block_bytes:
        kb = p.weight_block_bytes // 1024
        lines.append(f"frozen weights: dequantized in row blocks of at most {_human(p.weight_block_bytes)} while "
                     f"their op runs (export with --weight-block-kb {kb})")
    lines.append(f"micro-batch: {p.micro_batch_note}")
    lines.append("")
    mem_col = "RAM" if p.counts == "program" else "planned"
    head = (f"{'recipe':<12} {'batch':>5} {'micro':>5} {'input':>11} {mem_col:>10} {'flash':>10} {'trainable':>11}  "
            "fits? / reason")
    lines += [head, "-" * len(head)]
    for c in p.candidates:
        lines.append(f"{c.recipe:<12} {c.batch if c.batch else '–':>5} {c.micro_batch or '–':>5} "
                     f"{'×'.join(map(str, c.input_shape)):>11} "
                     f"{_human(shown) if (shown := c.ram_bytes if p.counts == 'program' else c.planned_bytes) is not None else '–':>10} "
                     f"{_human(c.flash_bytes) if c.flash_bytes is not None else '–':>10} "
                     f"{f'{c.trainable_params:,}' if c.trainable_params is not None else '–':>11}  "
                     f"{'PROPOSED' if c is p.chosen else ('yes' if c.fits else '–' if c.reason == SKIPPED else 'no')}: "
                     f"{c.reason}")
    return "\n".join(lines)
