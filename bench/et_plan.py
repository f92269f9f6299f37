"""ExecuTorch's memory plan of the lean train step, per recipe: its size, the planner's lower bound
(the most bytes alive at one instruction) and the largest tensors alive there.

    python bench/et_plan.py [--portable] [--weight-block-kb N] MODEL SIZE BATCH RECIPE [RECIPE ...]

e.g. `python bench/et_plan.py efficientnet_lite0 64 8 bias bias+mask` (a few minutes per recipe).
`--portable`: ExecuTorch's own kernels only (no XNNPACK), frozen weights int8 in the program and
dequantized in the step, so their fp32 copies are in the plan; `--weight-block-kb N`: dequantized
in row blocks of at most N KB (`edgetl.lowering.Lowering.weight_block_bytes`).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import edgetl
from edgetl.exporters import executorch as ex
from edgetl.optim import OptimizerConfig
from edgetl.step import LeanStep


def lowered_step(model: str, size: int, batch: int, recipe: str, delegate: bool = True,
                 weight_block_bytes: int | None = None):
    pm = edgetl.prepare(model, recipe, num_classes=10, input_size=size)
    opt = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    params = pm.initial_params()
    state = opt.init_state(params)
    flat = [params[t] for t in pm.trainable] + [state[k] for k in opt.state_names(pm.trainable)]
    low = dataclasses.replace(ex.lowering(delegate), weight_block_bytes=weight_block_bytes)
    step = LeanStep(pm, opt, low).eval()
    if delegate:
        ex.weights_as_fp32_constants(step)
    x, y = torch.zeros(batch, *pm.graph.input_shape), torch.zeros(batch, dtype=torch.int64)
    return ex._lower(step, (x, y, torch.tensor(0.05), *flat), delegate)


def planned_tensors(et) -> list[tuple[str, tuple[int, int], int, str, list[int]]]:
    """(node, lifetime, bytes, dtype, shape) of every tensor in the plan's arena, once each."""
    seen, out = set(), []
    for node in et.exported_program().graph_module.graph.nodes:
        specs = node.meta.get("spec")
        for s in specs if isinstance(specs, (list, tuple)) else [specs]:
            if getattr(s, "mem_id", None) is None or getattr(s, "lifetime", [None])[0] is None or id(s) in seen:
                continue
            seen.add(id(s))
            out.append((node.name, tuple(s.lifetime), s.allocated_memory, str(s.dtype), list(s.shape)))
    return out


def main() -> None:
    args = sys.argv[1:]
    delegate = "--portable" not in args
    args = [a for a in args if a != "--portable"]
    block = None
    if "--weight-block-kb" in args:
        i = args.index("--weight-block-kb")
        block = int(float(args[i + 1]) * 1024)
        del args[i : i + 2]
    model, size, batch, *recipes = args
    for recipe in recipes:
        et = lowered_step(model, int(size), int(batch), recipe, delegate, block)
        specs = planned_tensors(et)
        end = max(life[1] for _, life, *_ in specs)
        live = [0] * (end + 1)
        for _, (a, b), n, *_ in specs:
            for t in range(a, b + 1):
                live[t] += n
        peak = max(range(end + 1), key=live.__getitem__)
        ops = ex._delegated_ops(et)
        how = ("XNNPACK" if delegate else "portable") + (f", weight blocks {block // 1024} KB" if block else "")
        print(f"{model} {size}x{size} b{batch} {recipe} ({how}): plan {ex.planned_bytes(et) / 1e6:.3f} MB ({ex.planned_bytes(et) / 1024:.0f} KiB), "
              f"most alive at once {live[peak] / 1e6:.3f} MB (instruction {peak} of {end}), "
              f"{ops['delegate_calls']} delegate calls, {ops['portable_ops']} portable ops")
        for name, life, n, dtype, shape in sorted((s for s in specs if s[1][0] <= peak <= s[1][1]),
                                                  key=lambda s: -s[2])[:6]:
            print(f"   {n / 1e6:7.3f} MB  {dtype:14s} {shape}  {name} alive {life}")


if __name__ == "__main__":
    main()
