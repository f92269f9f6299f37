"""Executes a lean graph: forward keeping only what each rule declares, then backward.

The schedule is explicit (values are dropped after their last use, kept tensors after their
node's backward), so the same code gives the eager training step, the exported programs and,
run on meta tensors with a tracker, the analytic memory model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from .batch_parts import BatchParts, added
from .graph import LeanGraph
from .interpret import interpret
from .lowering import EAGER, Lowering, pins
from .rules import Need

Tensor = torch.Tensor


class NullTracker:
    def hold(self, key: str, t: Tensor, kind: str = "") -> None: ...
    def release(self, key: str) -> None: ...


class Weights(Mapping[str, Tensor]):
    """The tensors of one node: trainable ones as given, frozen ones fetched (and dequantized)
    afresh on every access, so no float copy of a frozen weight outlives the op using it."""

    def __init__(self, roles: dict[str, str], params: Mapping[str, Tensor], frozen: Callable[..., Tensor],
                 tracker, tag: str, zero: Tensor | None = None, lowering: Lowering = EAGER,
                 blocks: Mapping[str, list[tuple[int, int]]] | None = None, replay: bool = False,
                 int8: Callable[[str], tuple[Tensor, Tensor] | None] | None = None):
        self.roles, self.params, self.frozen, self.tracker, self.tag = roles, params, frozen, tracker, tag
        self.int8_source = int8  # a frozen tensor's stored (int8, scale), where the lowering asks for them
        self.replay = replay  # the analytic replay on meta tensors (rules read it through `lowering.replaying`)
        self.zero = zero  # an exact zero made from the op's input: dequantize no earlier than the op
        self.lowering = lowering  # what the target needs from the rules (read through this mapping)
        self.blocks = blocks or {}  # frozen tensors dequantized in row blocks: their [lo, hi) ranges
        self.transients: list[str] = []

    def trainable(self, role: str) -> bool:
        return role in self.roles and self.roles[role] in self.params

    def __getitem__(self, role: str) -> Tensor:
        name = self.roles[role]
        if name in self.params:
            return self.params[name]
        t = self.frozen(name, self.zero)
        key = f"w:{self.tag}:{role}:{len(self.transients)}"
        self.tracker.hold(key, t, "weights (dequantized, transient)")
        self.transients.append(key)
        return t

    def int8(self, role: str) -> tuple[Tensor, Tensor] | None:
        """The stored (int8, per-channel scale) of the frozen tensor in `role`, where the program was given
        them (`Lowering.int8_linear_weights`), else None."""
        if self.int8_source is None or role not in self.roles or self.trainable(role):
            return None
        return self.int8_source(self.roles[role])

    def in_blocks(self, role: str) -> bool:
        return role in self.roles and self.roles[role] in self.blocks and self.roles[role] not in self.params

    def row_blocks(self, role: str, fn: Callable[[int, int, Tensor], Tensor], add: bool = False) -> list[Tensor]:
        """`fn(lo, hi, rows)` per row block of the tensor in `role` (see `lowering.by_rows`); with
        `add`, one running sum of them. Each block is dequantized when reached and dropped after
        its `fn`, so one block is alive at a time; where the schedule is pinned, a block is made
        only after the previous part exists."""
        name = self.roles[role]
        if not self.in_blocks(role):
            t = self[role]
            return [fn(0, t.shape[0], t)]
        parts: list[Tensor] = []
        zero = self.zero
        for lo, hi in self.blocks[name]:
            t = self.frozen(name, zero, (lo, hi))
            key = f"w:{self.tag}:{role}:rows{lo}"
            self.tracker.hold(key, t, "weights (dequantized, transient)")
            part = fn(lo, hi, t)
            del t
            self.tracker.release(key)
            parts = [parts[0] + part] if add and parts else [*parts, part]
            del part
            if zero is not None:
                zero = parts[-1].reshape(-1)[:1].sum() * 0.0
        return parts

    def __iter__(self) -> Iterator[str]:
        return iter(self.roles)

    def __len__(self) -> int:
        return len(self.roles)

    def done(self) -> None:
        for key in self.transients:
            self.tracker.release(key)
        self.transients.clear()


class _Anchored(Mapping[str, Tensor]):
    """A node's tensors with an exact zero, computed from earlier masks, added to its bias."""

    def __init__(self, w: Weights, zero: Tensor):
        self.w, self.zero = w, zero

    def __getitem__(self, role: str) -> Tensor:
        t = self.w[role]
        return t + self.zero if role == "bias" else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.w)

    def __len__(self) -> int:
        return len(self.w)

    def __getattr__(self, name: str):  # the Weights' lowering and trainable() (rules read them)
        if name == "w":
            raise AttributeError(name)
        return getattr(self.w, name)


class Program:
    def __init__(self, graph: LeanGraph, frozen: Callable[..., Tensor], lowering: Lowering = EAGER,
                 replay: bool = False, order: list[str] | None = None,
                 int8: Callable[[str], tuple[Tensor, Tensor] | None] | None = None):
        # int8: a frozen tensor's stored (int8, scale) for the rules that take it (see `Weights.int8`).
        # replay (the analytic memory model): the rules run as `lowering` asks, but the program's own
        # schedule pins (exact zeros added to scales, biases and pool inputs) are left out: they
        # order a graph runtime's schedule and hold no memory there. `order`: the forward's nodes in
        # the order the replayed runtime runs them (a topological order; default: the graph's)
        self.graph, self.frozen, self.lowering, self.replay = graph, frozen, lowering, replay
        self.by_name = {n.name: n for n in graph.nodes}
        self.int8 = int8
        self.order = [graph.node(name) for name in order] if order else list(graph.nodes)
        pos = {n.name: i for i, n in enumerate(self.order)}
        self.pins = lowering.pin_schedule and not replay
        trainable = set(graph.trainable)
        self.req = graph.requires_grad()
        self.need = {
            n.name: Need(
                inputs=tuple(self.req[i] for i in n.inputs),
                params=frozenset(r for r, t in n.params.items() if t in trainable),
            )
            for n in graph.nodes
        }
        uses = {k: sorted(v, key=pos.__getitem__) for k, v in graph.consumers().items()}
        self.uses = {k: len(v) for k, v in uses.items()}
        self.last_use = {k: v[-1] for k, v in uses.items() if v}
        # replay of onnxruntime's schedule: a pointwise rule's local derivative (made from what it
        # kept alone) is computed where onnxruntime's scheduler puts it, before the backward of the
        # consumer that gives its gradient last (the consumer first in the forward), not after it:
        # that runtime visits an op's latest-created input first, and the derivative is created after
        # the gradient (measured: EfficientNet-B0-like bias+mask b32, one input size less at peak)
        self.early_local = {}
        if replay and lowering.pin_schedule:
            for name, users in uses.items():
                if users:
                    self.early_local.setdefault(users[0], []).append(name)
        # replay of onnxruntime's NCHWc kernels (`Rule.reads_nchwc`): a value read by such ops is reordered
        # once, by its first reader; the copy replaces it where every user is such a reader (the value then
        # lives on only where a rule keeps it), else it lives beside it until its last reader
        self.nchwc: dict[str, tuple[bool, str]] = {}  # value: (every user a reader, its last reader)
        self.nchwc_readers: set[str] = set()
        if replay and lowering.pin_schedule:
            readers = {n.name for n in graph.nodes if n.inputs and n.rule.reads_nchwc(self.need[n.name])}
            self.nchwc_readers = readers
            for v, users in uses.items():
                r = [u for u in users if u in readers and graph.node(u).inputs[0] == v]
                if r:
                    self.nchwc[v] = (len(r) == len(users), r[-1])
        self.dequantizes = {n.name: any(graph.is_quantized(t) for t in n.params.values()) for n in graph.nodes}
        self.blocks = lowering.row_blocks(graph)
        # inside a chain of per-sample rules run by batch parts, each rule returns plain tensors for its part
        self.chain_lowering = dataclasses.replace(lowering, batch_parts_carried=False)

    def weights(self, node, params, tracker, anchor: Tensor | None = None, lowering: Lowering | None = None
                ) -> Weights:
        # Graph runtimes schedule an op with no data inputs (dequantizing a frozen weight) as
        # early as they like, and then every float copy of the weights is alive at once. An
        # exact zero made from the op's own input pins each dequantization to its use.
        pin = self.pins and anchor is not None and self.dequantizes[node.name]
        zero = anchor.reshape(-1)[:1].sum() * 0.0 if pin else None
        return Weights(node.params, params, self.frozen, tracker, node.name, zero, lowering or self.lowering,
                       self.blocks, self.replay, self.int8)

    def forward(self, x: Tensor, params: Mapping[str, Tensor], train: bool = True, tracker=None
                ) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
        tracker = tracker or NullTracker()
        kept: dict[str, dict[str, Tensor]] = {}
        pending: list[Tensor] = []  # exact zeros that depend on masks kept since the last bias
        deferred: list = []  # replay of onnxruntime's order: quantized keeps made after the next op

        def keep_deferred() -> None:
            while deferred:
                name, box = deferred.pop(0)
                k = self.graph.node(name).rule.keep_from(box)
                del box
                for key, t in k.items():
                    tracker.hold(f"kept:{name}:{key}", t, "kept for backward")
                kept[name] = k

        vals: dict[str, Tensor] = {}
        copies: dict[str, Tensor] = {}  # values reordered to NCHWc, read so by the rest of their readers

        def op(n, xs: list[Tensor]) -> Tensor:
            nonlocal pending
            v = n.inputs[0] if n.inputs else None
            nchwc = self.nchwc.get(v) if train and n.name in self.nchwc_readers else None
            if nchwc and v not in copies:
                copies[v] = torch.empty_like(xs[0])
                if nchwc[0]:  # every user reads the copy: it replaces the value
                    if v in vals:  # (the interpreter drops a value before its last user)
                        vals[v] = copies[v]
                    tracker.hold(f"val:{v}", copies[v], "activations (flowing)")
                else:
                    tracker.hold(f"nchwc:{v}", copies[v], "activations (flowing)")
            if nchwc:
                xs[0] = copies[v]
                if nchwc[1] == n.name:
                    del copies[v]
            w = self.weights(n, params, tracker, xs[0])
            need = self.need[n.name] if train else Need((False,) * len(n.inputs), frozenset())
            ws = w
            if pending and "bias" in n.params:
                # A data dependency that makes graph runtimes compute each mask in the forward,
                # right away: left to their scheduler, a mask may be computed just before its use
                # in the backward, keeping the float activation it is made from alive until then.
                ws = _Anchored(w, torch.stack(pending).sum() * 0.0)
                pending = []
            elif pending and getattr(n.rule, "kind", None) == "maxpool":
                # A max pool builds its -inf-padded copy and its taps from its input: pinned here,
                # the masks made from that input (a stem ReLU's) come first and it dies after the
                # pad, instead of living through the pooling (ResNet: 1 input size less at peak).
                xs = [xs[0] + torch.stack(pending).sum() * 0.0, *xs[1:]]
                pending = []
            if self.replay and pins(w) and getattr(n.rule, "drops_inputs", False):
                # the rule drops its inputs where onnxruntime frees them, inside its forward (a max
                # pool after its pad): no longer held by name once this node is their last use
                for i in n.inputs:
                    if self.last_use.get(i) == n.name:
                        tracker.release(f"val:{i}")
            if self.replay and self.lowering.pin_schedule and train and getattr(n.rule, "keep_from", None) \
                    and n.rule.quant_bits and need.inputs[0]:
                # onnxruntime runs the next op (a depthwise conv) before the quantized derivative this
                # rule keeps, which then reads the input and output it frees as it goes (EfficientNet-B0-
                # like bias+mask+q8: its peak is that conv, with the input still alive)
                y = n.rule.compute(xs, ws)
                box, k = [xs.pop(0), y], {}
            else:
                y, k = n.rule.forward(xs, ws, need)
                box = None
            del xs
            w.done()
            keep_deferred()
            if box is not None:
                deferred.append((n.name, box))
                box = None
            if self.pins:
                # masks, and the codes of q8/q4 keeps: made only for the backward, from a float tensor
                pending += [t.reshape(-1)[:1].to(torch.float32).sum() for t in k.values()
                            if not t.dtype.is_floating_point]
            if nchwc and nchwc[1] == n.name:
                tracker.release(f"nchwc:{v}")
            tracker.hold(f"val:{n.name}", y, "activations (flowing)")
            for key, t in k.items():
                tracker.hold(f"kept:{n.name}:{key}", t, "kept for backward")
            if k:
                kept[n.name] = k
            return y

        logits = interpret(self.graph, x, op, lambda name: tracker.release(f"val:{name}"), self.order, vals)
        keep_deferred()
        return logits, kept

    def backward(self, g_logits: Tensor, kept: dict[str, dict[str, Tensor]], params: Mapping[str, Tensor],
                 tracker=None, on_param_grad: Callable[[str, Tensor], None] | None = None) -> dict[str, Tensor]:
        """The parameter gradients; with `on_param_grad`, each is handed to it as soon as it exists
        (and not returned): the analytic replay updates a parameter there, as onnxruntime does."""
        tracker = tracker or NullTracker()
        grads = {self.graph.output: g_logits}
        tracker.hold(f"grad:{self.graph.output}", g_logits, "gradients (flowing)")
        pgrads: dict[str, Tensor] = {}
        for n in reversed(self.graph.nodes):
            need = self.need[n.name]
            if not self.req[n.name] or n.name not in grads:
                continue
            if isinstance(grads[n.name], BatchParts):
                if n.rule.per_sample:
                    self._chain_by_parts(n, grads, kept, params, tracker, pgrads, on_param_grad)
                    continue
                _release(tracker, f"grad:{n.name}", grads[n.name])
                grads[n.name] = grads[n.name].joined()
                tracker.hold(f"grad:{n.name}", grads[n.name], "gradients (flowing)")
            for i in self.early_local.get(n.name, ()):
                self._local_derivative(i, kept, tracker)
            w = self.weights(n, params, tracker, grads[n.name])
            k = kept.pop(n.name, {})
            if self.replay and self.lowering.pin_schedule and getattr(n.rule, "drops_grad", False):
                # the rule drops the incoming gradient where onnxruntime frees it, inside its backward
                tracker.release(f"grad:{n.name}")
            if self.replay and self.lowering.pin_schedule:
                for key in getattr(n.rule, "drops_kept", ()):  # popped from `k` by the rule, freed inside it
                    tracker.release(f"kept:{n.name}:{key}")
            gin, gp = n.rule.backward(grads.pop(n.name), k, w, need)  # the rule's reference is the only one
            w.done()
            _hand_on_param_grads(n, gp, tracker, pgrads, on_param_grad)
            self._pass_on(n, gin, grads, tracker)
            tracker.release(f"grad:{n.name}")
            for key in k:
                tracker.release(f"kept:{n.name}:{key}")
            # Drop every local reference now, so tensors die where the schedule says (this also
            # keeps the analytic replay on meta tensors honest).
            del k, gin, gp, w
            gi = None
        return pgrads

    def _pass_on(self, n, gin: list, grads: dict, tracker) -> None:
        """Add node n's input gradients `gin` (tensors or batch parts) into `grads`."""
        for i, gi, needed in zip(n.inputs, gin, self.need[n.name].inputs):
            if needed and gi is not None:
                if i in grads:
                    _release(tracker, f"grad:{i}", grads[i])
                    grads[i] = added(grads[i], gi)
                else:
                    grads[i] = gi
                _hold(tracker, f"grad:{i}", grads[i], "gradients (flowing)")

    def _per_sample_chain(self, n) -> list:
        """n and the nodes before it whose gradient comes from the previous one alone (one needed input, read by
        nothing else), all per-sample rules (`Rule.per_sample`): what a batch part runs through on its own."""
        chain = [n]
        while True:
            needed = [i for i, want in zip(n.inputs, self.need[n.name].inputs) if want]
            if len(needed) != 1 or self.uses.get(needed[0]) != 1 or not self.req.get(needed[0]):
                return chain
            n = self.by_name.get(needed[0])
            if n is None or not n.rule.per_sample:
                return chain
            chain.append(n)

    def _chain_by_parts(self, first, grads: dict, kept: dict, params, tracker, pgrads: dict,
                        on_param_grad) -> None:
        """The backward of `_per_sample_chain(first)` with `first`'s gradient in batch parts
        (`Lowering.batch_parts_carried`): each part through the whole chain before the next, each rule given that
        part of what it kept and its frozen weights made and released around its call (as outside a chain);
        parameter gradients added over the parts; the chain's last node's input gradients passed on as parts.
        Within the chain one part's gradients are alive at a time, but each part's input gradients of the last
        node live on until all parts are done (they are what is passed on)."""
        chain = self._per_sample_chain(first)
        g = grads.pop(first.name)
        ks = [kept.pop(c.name, {}) for c in chain]
        sums: list[dict[str, Tensor]] = [{} for _ in chain]
        ends: list[list] = []
        for lo, hi, make in g.bounds():
            # the part's share of what the chain kept first, then the part: in the exported step, slices the
            # delegate leaves to ExecuTorch (int8 masks) then sit before the part's whole chain, not inside it
            kept_part = [{key: v[lo:hi] for key, v in k.items()} for k in ks]
            gp = make()
            for c, k, total in zip(chain, kept_part, sums):
                gin = self._part_backward(c, gp, k, params, tracker, total)
                gp = next((gi for gi, want in zip(gin, self.need[c.name].inputs) if want), None)
            ends.append(gin)
        _release(tracker, f"grad:{first.name}", g)
        del g, gin, gp, kept_part
        for c, k, total in zip(chain, ks, sums):
            for key in k:
                tracker.release(f"kept:{c.name}:{key}")
            _hand_on_param_grads(c, total, tracker, pgrads, on_param_grad)
        last = chain[-1]
        gin = [None if any(e[j] is None for e in ends) else BatchParts.of([e[j] for e in ends])
               for j in range(len(last.inputs))]
        self._pass_on(last, gin, grads, tracker)

    def _part_backward(self, n, g: Tensor, k: dict[str, Tensor], params, tracker, total: dict[str, Tensor]) -> list:
        """Node n's backward for one batch part `g` inside a chain: its input gradients as plain tensors (a rule that
        would carry batch parts of its own, a second strided depthwise conv, joins them: `Rule.per_sample`), its
        parameter gradients added into `total`, its frozen weights released right after it."""
        w = self.weights(n, params, tracker, lowering=self.chain_lowering)
        gin, gparams = n.rule.backward(g, k, w, self.need[n.name])
        w.done()
        for role, t in gparams.items():
            total[role] = total[role] + t if role in total else t
        return gin

    def _local_derivative(self, name: str, kept: dict[str, dict[str, Tensor]], tracker) -> None:
        """Replace what node `name` kept by its local derivative (`Rule.local_derivative`), if it has one."""
        k = kept.get(name)
        d = self.graph.node(name).rule.local_derivative(k, torch.float32) if k else None
        if d is None:
            return
        for key, t in d.items():
            tracker.hold(f"kept:{name}:{key}", t, "kept for backward")
        for key in k:
            if key not in d:
                tracker.release(f"kept:{name}:{key}")
        kept[name] = d

    def loss_and_grads(self, x: Tensor, y: Tensor, params: Mapping[str, Tensor], tracker=None
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits, kept = self.forward(x, params, True, tracker)
        loss, g = cross_entropy_with_grad(logits, y)
        if tracker is not None:
            tracker.hold("logits", logits, "activations (flowing)")
        return loss, logits, self.backward(g, kept, params, tracker)


def cross_entropy_with_grad(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and its gradient w.r.t. the logits, (softmax - onehot) / N."""
    logp = F.log_softmax(logits, dim=1)
    onehot = (y.reshape(-1, 1) == torch.arange(logits.shape[1], device=y.device).reshape(1, -1)).to(logits.dtype)
    n = logits.shape[0]
    loss = -(logp * onehot).sum() / n
    return loss, (torch.exp(logp) - onehot) / n


def _hand_on_param_grads(n, gp: dict[str, Tensor], tracker, pgrads: dict[str, Tensor],
                         on_param_grad: Callable[[str, Tensor], None] | None) -> None:
    """Node n's parameter gradients `gp` (by role): recorded in `pgrads`, or handed to `on_param_grad` as they exist."""
    for role, t in gp.items():
        tracker.hold(f"pgrad:{n.params[role]}", t, "parameter gradients")
        if on_param_grad is None:
            pgrads[n.params[role]] = t
        else:
            on_param_grad(n.params[role], t)


def _hold(tracker, key: str, v: Tensor | BatchParts, kind: str) -> None:
    if isinstance(v, BatchParts):  # the parts made so far (the others are made, and seen, where they are used)
        for j, p in enumerate(v.made):
            tracker.hold(f"{key}[{j}]", p, kind)
    else:
        tracker.hold(key, v, kind)


def _release(tracker, key: str, v: Tensor | BatchParts) -> None:
    if isinstance(v, BatchParts):
        for j in range(len(v.made)):
            tracker.release(f"{key}[{j}]")
    else:
        tracker.release(key)
