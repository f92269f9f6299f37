"""Micro-batches inside the exported step: the program takes `micro_batch` samples and accumulates
gradients over batch_size / micro_batch calls before one optimizer update (`OptimizerConfig.accumulate`).
Exact (to float rounding) wherever every op treats samples independently: edgetl's graphs use eval
semantics (BatchNorm folded or applied with its running statistics), so no recipe mixes samples; a
rule that does (`mixes_batch`) is refused."""
from __future__ import annotations

import dataclasses

from .errors import EdgeTLError
from .optim import OptimizerConfig
from .runtime.targets import TARGETS, TargetSpec


def check_target(spec: TargetSpec, batch_size: int, micro_batch: int | None) -> None:
    """Refuse micro-batches for a target whose spec does not take them (`TargetSpec.micro_batches`: the
    accumulators are optimizer state the step program must take and return)."""
    if micro_batch is not None and micro_batch != batch_size and not spec.micro_batches:
        takes = " and ".join(t.name for t in TARGETS.values() if t.micro_batches)
        raise EdgeTLError(f"micro_batch is for the {takes} targets; the {spec.name} target's step takes whole "
                          f"batches (export without micro_batch)")


def accumulating(prepared, optimizer: OptimizerConfig, batch_size: int, micro_batch: int | None) -> OptimizerConfig:
    """`optimizer` accumulating batch_size / micro_batch micro-batches per update (unchanged when
    micro_batch is None or the whole batch); refuses what would not equal one full-batch step."""
    if micro_batch is None or micro_batch == batch_size:
        return optimizer
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise EdgeTLError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if batch_size % micro_batch:
        raise EdgeTLError(f"micro_batch {micro_batch} does not divide batch_size {batch_size}: each optimizer "
                          f"step must be a whole number of micro-batches")
    mixing = [n.name for n in prepared.graph.nodes if n.rule.mixes_batch]
    if mixing:
        raise EdgeTLError(f"micro_batch is refused: node {mixing[0]!r} computes statistics over the batch "
                          f"(e.g. BatchNorm in train mode, not folded), so micro-batches would not equal one "
                          f"full-batch step")
    if optimizer.accumulate != 1:
        raise EdgeTLError(f"the optimizer already accumulates {optimizer.accumulate} micro-batches; give "
                          f"micro_batch or accumulate, not both")
    return dataclasses.replace(optimizer, accumulate=batch_size // micro_batch)
