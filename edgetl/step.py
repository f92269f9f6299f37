"""The lean training step as one torch module: forward, cross-entropy, backward and the
optimizer update, from (batch, labels, lr, params, state) to (loss, logits, new params, new state).
No autograd is involved, so the module runs eagerly on CPU or CUDA and exports as a plain program."""
from __future__ import annotations

import torch
import torch.nn as nn

from .lowering import EAGER, Lowering
from .optim import OptimizerConfig
from .program import Program

Tensor = torch.Tensor


class _FrozenStore(nn.Module):
    """Frozen tensors as buffers (int8 + scale, or fp32), dequantized where used with the
    lowering's op (e.g. ONNX DequantizeLinear)."""

    def __init__(self, prepared, lowering: Lowering = EAGER):
        super().__init__()
        self.dequantize = lowering.dequantize
        self.slots: dict[str, tuple[str, ...]] = {}
        # tensors the lowering dequantizes by rows: one set of buffers per row block, [lo, hi) -> keys
        self.block_slots: dict[str, dict[tuple[int, int], tuple[str, ...]]] = {}
        blocks = lowering.row_blocks(prepared.graph)
        # dequantized from constants alone, never pinned: a graph runtime folds them to fp32 at load
        self.unpinned = lowering.foldable_weights(prepared.graph)
        # int8 weights the rules read as stored (`Weights.int8`): an exporter keeps them int8
        self.int8_weights = lowering.int8_linear_weights(prepared.graph)
        for i, (name, stored) in enumerate(prepared.stored.items()):
            if name in blocks:
                self.block_slots[name] = {}
                for b, (lo, hi) in enumerate(blocks[name]):
                    keys = tuple(f"f{i}_b{b}_{j}" for j in range(len(stored)))
                    for k, t in zip(keys, stored):
                        self.register_buffer(k, t[lo:hi].clone())
                    self.block_slots[name][(lo, hi)] = keys
                continue
            keys = tuple(f"f{i}_{j}" for j in range(len(stored)))
            for k, t in zip(keys, stored):
                self.register_buffer(k, t.clone())
            self.slots[name] = keys

    def get(self, name: str, zero: Tensor | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        """A frozen tensor as the step uses it (or its rows [lo, hi) where it is stored by rows)."""
        if name in self.unpinned:
            zero = None
        if name in self.block_slots:
            blocks = self.block_slots[name]
            if rows is not None:
                return self._read(blocks[rows], zero)
            return torch.cat([self._read(keys, zero) for keys in blocks.values()])
        t = self._read(self.slots[name], zero)
        return t if rows is None else t[rows[0]:rows[1]]

    def int8(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The stored (int8, per-channel scale) of a weight in `int8_weights`, else None."""
        keys = self.slots.get(name, ())
        if name not in self.int8_weights or len(keys) != 2:
            return None
        return getattr(self, keys[0]), getattr(self, keys[1])

    def _read(self, keys: tuple[str, ...], zero: Tensor | None) -> Tensor:
        if len(keys) == 2:
            scale = getattr(self, keys[1])
            return self.dequantize(getattr(self, keys[0]), scale if zero is None else scale + zero)
        return getattr(self, keys[0])


class LeanStep(nn.Module):
    def __init__(self, prepared, optimizer: OptimizerConfig, lowering: Lowering = EAGER):
        super().__init__()
        self.prepared = prepared
        self.optimizer = optimizer
        self.trainable = prepared.trainable
        self.state_names = optimizer.state_names(self.trainable)
        self.store = _FrozenStore(prepared, lowering)
        self.program = Program(prepared.graph, self.store.get, lowering, int8=self.store.int8)

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.optimizer.init_state(params)

    def forward(self, x: Tensor, y: Tensor, lr: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        n = len(self.trainable)
        params = dict(zip(self.trainable, flat[:n]))
        state = dict(zip(self.state_names, flat[n:]))
        loss, logits, grads = self.program.loss_and_grads(x, y, params)
        new_p, new_s = self.optimizer.update(params, grads, state, lr)
        return (loss, logits, *(new_p[t] for t in self.trainable), *(new_s[s] for s in self.state_names))

    def run(self, x: Tensor, y: Tensor, lr: float, params: dict[str, Tensor], state: dict[str, Tensor]
            ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """One eager step with named tensors; returns (loss, logits, new params, new state, grads)."""
        p = [params[t] for t in self.trainable]
        s = [state[k] for k in self.state_names]
        lr_t = torch.tensor(lr, dtype=torch.float32, device=x.device)
        loss, logits, grads = self.program.loss_and_grads(x, y, dict(zip(self.trainable, p)))
        new_p, new_s = self.optimizer.update(dict(zip(self.trainable, p)), grads, dict(zip(self.state_names, s)), lr_t)
        return loss, logits, new_p, new_s, grads


class LeanEval(nn.Module):
    """Logits from (batch, params): the eval and inference program."""

    def __init__(self, prepared, lowering: Lowering = EAGER):
        super().__init__()
        self.trainable = prepared.trainable
        self.store = _FrozenStore(prepared, lowering)
        self.program = Program(prepared.graph, self.store.get, lowering, int8=self.store.int8)

    def forward(self, x: Tensor, *flat: Tensor) -> Tensor:
        return self.program.forward(x, dict(zip(self.trainable, flat)), train=False)[0]
