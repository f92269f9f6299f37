"""Optimizer updates as plain tensor arithmetic, so they export with the step.

The arithmetic follows torch.optim.SGD (momentum, no dampening) and torch.optim.AdamW
(decoupled weight decay, bias correction) so that a lean step matches them to float precision.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import EdgeTLError

Tensor = torch.Tensor
OPTIMIZERS = ("sgd", "adamw")
MICRO_STEP = "micro_step"  # the state counting micro-batches since the last optimizer update


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # micro-batches per optimizer step: the step accumulates (1/accumulate)·grad in `accum:{t}` state and
    # applies the update on every accumulate-th call (counted by the `micro_step` state), else leaves the
    # parameters and the optimizer's own state as they were
    accumulate: int = 1

    def __post_init__(self):
        if not isinstance(self.accumulate, int) or isinstance(self.accumulate, bool) or self.accumulate < 1:
            raise EdgeTLError(f"accumulate must be a positive integer, got {self.accumulate!r}")
        if self.name not in OPTIMIZERS:
            raise EdgeTLError(f"unknown optimizer '{self.name}'; choose one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EdgeTLError(f"learning rate must be a finite number > 0, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):  # 1 and above never decay: the update grows without bound
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise EdgeTLError(f"{name} must lie in [0, 1), got {v}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise EdgeTLError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise EdgeTLError(f"eps must be a finite number > 0, got {self.eps}")

    @classmethod
    def make(cls, name: str = "sgd", lr: float | None = None, **kw) -> "OptimizerConfig":
        defaults = {"sgd": {"lr": 0.01}, "adamw": {"lr": 1e-3, "weight_decay": 0.01}}
        if name not in defaults:
            raise EdgeTLError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
        args = {**defaults[name], **kw}
        if lr is not None:
            args["lr"] = lr
        return cls(name=name, **args)

    def to_dict(self) -> dict:
        return asdict(self)

    def state_names(self, trainable: list[str]) -> list[str]:
        names = self._own_state_names(trainable)
        if self.accumulate > 1:
            names += [f"accum:{t}" for t in trainable] + [MICRO_STEP]
        return names

    def _own_state_names(self, trainable: list[str]) -> list[str]:
        if self.name == "sgd":
            return [f"momentum:{t}" for t in trainable]
        return [f"exp_avg:{t}" for t in trainable] + [f"exp_avg_sq:{t}" for t in trainable] + ["step"]

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {n: torch.zeros_like(params[n.split(":", 1)[1]]) for n in self.state_names(list(params)) if ":" in n}
        for n in ("step", MICRO_STEP):
            if n in self.state_names(list(params)):
                state[n] = torch.zeros((), dtype=torch.float32)
        return state

    def update(
        self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Tensor], lr: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        apply = self._sgd if self.name == "sgd" else self._adamw
        if self.accumulate == 1:
            return apply(params, grads, state, lr)
        return self._accumulating(apply, params, grads, state, lr)

    def _accumulating(self, apply, params, grads, state, lr):
        """One micro-batch: grads (of the micro-batch's mean loss) added to the accumulators as
        1/accumulate of them, and the optimizer applied to the accumulated (full-batch mean) gradient
        on the accumulate-th call. Selected by tensor arithmetic, so the program is the same every call."""
        k = self.accumulate
        acc = {t: state[f"accum:{t}"] + grads[t] * (1.0 / k) for t in params}
        count = state[MICRO_STEP] + 1
        due = count >= k
        own = {n: state[n] for n in self._own_state_names(list(params))}
        new_p, new_s = apply(params, acc, own, lr)
        out_p = {t: torch.where(due, new_p[t], params[t]) for t in params}
        out_s = {n: torch.where(due, new_s[n], own[n]) for n in own}
        for t in params:
            out_s[f"accum:{t}"] = torch.where(due, torch.zeros_like(acc[t]), acc[t])
        out_s[MICRO_STEP] = torch.where(due, torch.zeros_like(count), count)
        return out_p, out_s

    def _sgd(self, params, grads, state, lr):
        new_p, new_s = {}, {}
        for t, p in params.items():
            g = grads[t]
            if self.weight_decay:
                g = g + self.weight_decay * p
            buf = state[f"momentum:{t}"] * self.momentum + g
            new_s[f"momentum:{t}"] = buf
            new_p[t] = p - lr * buf
        return new_p, new_s

    def _adamw(self, params, grads, state, lr):
        step = state["step"] + 1
        bc1 = 1 - torch.pow(torch.tensor(self.beta1), step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.tensor(self.beta2), step))
        new_p, new_s = {}, {}
        for t, p in params.items():
            g = grads[t]
            p = p * (1 - lr * self.weight_decay)
            m = state[f"exp_avg:{t}"] * self.beta1 + g * (1 - self.beta1)
            v = state[f"exp_avg_sq:{t}"] * self.beta2 + g * g * (1 - self.beta2)
            new_s[f"exp_avg:{t}"], new_s[f"exp_avg_sq:{t}"] = m, v
            new_p[t] = p - (lr / bc1) * m / (torch.sqrt(v) / bc2_sqrt + self.eps)
        new_s["step"] = step
        return new_p, {n: new_s[n] for n in self._own_state_names(list(params))}

    def torch_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer this config reproduces (the parity reference)."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(
            params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps, weight_decay=self.weight_decay
        )
