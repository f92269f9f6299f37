"""How far each target's training step is from the truth. The reference: the same prepared model's torch lean step
in float64 on the frozen weights as every fp32 step has them (int8 dequantized in fp32), the same batch, the same
SGD. Each run takes the same steps from the same start; every trainable tensor and momentum is compared after each
step (a momentum after step 1 is that step's gradient), per tensor max |got - ref| / max |ref|, printed as each
group's median and worst tensor (conv biases' momenta, all momenta, parameters), written as JSON. Runs: autograd in
float64 (checks the reference), float64 with the weights dequantized in float64 (each weight moved by at most half
an fp32 ulp: how much the step itself moves under rounding-sized changes, the floor below which fp32 runs cannot be
told apart), the torch fp32 step, the onnx bundle, ExecuTorch bundles, one per `Lowering.xnnpack_bias_sum_max_bytes`.
With --sums: the conv bias sums alone (bias_sums).

    python bench/float64_reference.py                               # Lite0 224 b8 bias+mask, ET at 16 MiB and 0
    python bench/float64_reference.py --model mnist_cnn --size 28 --batch 32 --limits 16 0
    python bench/float64_reference.py --sums     # the bias sums alone, on Lite0's gradient shapes (see bias_sums)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "float64_reference.json"
SUMS_RESULTS = ROOT / "bench" / "results" / "float64_bias_sums.json"
MiB = 2**20

State = dict[str, np.ndarray]


def torch_steps(pm, opt, x: np.ndarray, y: np.ndarray, steps: int, dtype: torch.dtype,
                fp32_weights: bool = True) -> list[State]:
    """The torch lean step's parameters and state after each of `steps` steps, computed in `dtype` on the frozen
    weights dequantized in fp32 as every fp32 step has them (fp32_weights=False: dequantized in `dtype`, each
    weight moved by up to half an fp32 ulp)."""
    step = pm.step_module(opt).to(dtype)
    if fp32_weights:
        dequantize = step.store.dequantize
        step.store.dequantize = lambda q, scale: dequantize(q, scale.float()).to(scale.dtype)
    params = {k: v.to(dtype) for k, v in pm.initial_params().items()}
    state = step.init_state(params)
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y.astype(np.int64))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            _, _, params, state, _ = step.run(xt, yt, opt.lr, params, state)
            assert all(v.dtype == dtype for v in {**params, **state}.values()), "a step left " + str(dtype)
            out.append({k: v.double().numpy() for k, v in {**params, **state}.items()})
    return out


def autograd_steps(pm, opt, x: np.ndarray, y: np.ndarray, steps: int) -> list[State]:
    """As torch_steps in float64, by autograd and torch.optim (edgetl.reference's parity reference), on the frozen
    weights dequantized in fp32 as the fp32 steps use them: how far the lean float64 reference is from another."""
    import torch.nn.functional as F

    from edgetl.interpret import computing, interpret, weights_from

    leaves = {t: v.double().requires_grad_(True) for t, v in pm.initial_params().items()}
    sgd = opt.torch_optimizer(list(leaves.values()))
    weights = computing(weights_from(leaves, lambda t: pm.frozen(t).double()), reference=True)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y.astype(np.int64))
    out = []
    for _ in range(steps):
        sgd.zero_grad()
        F.cross_entropy(interpret(pm.graph, xt, weights), yt).backward()
        sgd.step()
        out.append({**{t: v.detach().numpy().copy() for t, v in leaves.items()},
                    **{f"momentum:{t}": sgd.state[v]["momentum_buffer"].numpy().copy() for t, v in leaves.items()}})
    return out


def bundle_steps(path: Path, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> list[State]:
    """A bundle's parameters and state after each step, run by the torch-free runtime (x in [0, 1])."""
    from edgetl.runtime import Trainer

    trainer = Trainer.load(path)
    out = []
    for _ in range(steps):
        trainer.train_step(x, y, lr)
        out.append({k: v.astype(np.float64) for k, v in trainer.get_state().items()})
    return out


def export_executorch(pm, opt, out: Path, batch: int, limit: int | None) -> Path:
    """An executorch bundle with `DELEGATED.xnnpack_bias_sum_max_bytes` = `limit` for this export only."""
    from edgetl.exporters import executorch as etx
    from edgetl.exporters import export

    kept = etx.DELEGATED
    etx.DELEGATED = dataclasses.replace(kept, xnnpack_bias_sum_max_bytes=limit)
    try:
        return export(pm, "executorch", out, opt, batch_size=batch)
    finally:
        etx.DELEGATED = kept


def rel_errors(got: State, ref: State) -> dict[str, float]:
    """Per tensor: max |got - ref| / max |ref|."""
    return {k: float(np.abs(got[k] - r).max() / max(float(np.abs(r).max()), 1e-30)) for k, r in ref.items()}


def conv_biases(pm) -> set[str]:
    """The trainable conv biases (what `rules.conv.bias_grad` sums)."""
    return {n.params["bias"] for n in pm.graph.nodes if n.rule.kind == "conv2d" and "bias" in n.params
            and n.params["bias"] in pm.trainable}


def summary(errs: dict[str, float], biases: set[str]) -> dict[str, dict]:
    """Each non-empty group's median error and its worst tensor."""
    groups: dict[str, Callable[[str], bool]] = {
        "conv bias momenta": lambda k: k.startswith("momentum:") and k.split(":", 1)[1] in biases,
        "all momenta": lambda k: k.startswith("momentum:"),
        "parameters": lambda k: ":" not in k,
    }
    out = {}
    for name, keep in groups.items():
        keys = [k for k in errs if keep(k)]
        if not keys:  # e.g. no trainable conv biases (--recipe head)
            continue
        worst = max(keys, key=errs.get)
        out[name] = {"median": float(np.median([errs[k] for k in keys])), "max": errs[worst], "worst": worst}
    return out


def bias_sum_errors(g: torch.Tensor, limits: dict[str, int | None], work: Path) -> dict[str, float]:
    """The error of one conv bias gradient (the sum of fp32 `g` over (N, H, W)) against its float64 sum: torch's
    fp32 sum, and ExecuTorch's (XNNPACK lowering) with each `xnnpack_bias_sum_max_bytes` in `limits`."""
    from types import SimpleNamespace

    from edgetl.exporters.executorch import DELEGATED, _lower
    from edgetl.rules.conv import bias_grad
    from edgetl.runtime.backends.executorch import NativeMethod

    class BiasGrad(torch.nn.Module):
        def __init__(self, limit: int | None):
            super().__init__()
            self.w = SimpleNamespace(lowering=dataclasses.replace(DELEGATED, xnnpack_bias_sum_max_bytes=limit))

        def forward(self, g):
            return bias_grad(g, tuple(g.shape[1:]), self.w)

    ref = g.double().sum((0, 2, 3))
    scale = float(ref.abs().max())
    out = {"torch fp32": float((g.sum((0, 2, 3)).double() - ref).abs().max()) / scale}
    for name, limit in limits.items():
        path = work / f"{name}.pte"
        path.write_bytes(_lower(BiasGrad(limit).eval(), (g,), True).buffer)
        (got,) = NativeMethod(path)([g.numpy()])
        out[name] = float((torch.from_numpy(got).double() - ref).abs().max()) / scale
    return out


def bias_sums(args) -> int:
    """`bias_sum_errors` for every distinct conv output shape of the model whose bias trains, on a masked
    Gaussian gradient (half its values zero, as a ReLU's): sums of N*H*W values that mostly cancel."""
    import edgetl

    pm = edgetl.prepare(args.model, args.recipe, num_classes=args.classes, input_size=args.size)
    biases = conv_biases(pm)
    shapes = sorted({(args.batch, *n.out_shape) for n in pm.graph.nodes if n.params.get("bias") in biases},
                    key=lambda s: -np.prod(s))
    gen = torch.Generator().manual_seed(0)
    limits = {"ET XNNPACK means": 2**62, "ET portable sums": None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetl-f64-") as d:
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) > 0.5)
            rows.append({"shape": shape, "MiB": g.numel() * 4 / MiB, **bias_sum_errors(g, limits, Path(d))})
            print("  ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "sums": rows}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    import edgetl
    from edgetl.exporters import export
    from edgetl.runtime.data import normalize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--recipe", default="bias+mask")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--limits", type=float, nargs="*", default=[16, 0],
                   help="ExecuTorch xnnpack_bias_sum_max_bytes, MiB, one bundle each")
    p.add_argument("--sums", action="store_true", help="the conv bias sums alone (bias_sums), no steps")
    p.add_argument("--json", help=f"default: {RESULTS.name}, with --sums {SUMS_RESULTS.name} (bench/results)")
    args = p.parse_args(argv)
    args.json = args.json or str(SUMS_RESULTS if args.sums else RESULTS)
    if args.sums:
        return bias_sums(args)

    pm = edgetl.prepare(args.model, args.recipe, num_classes=args.classes, input_size=args.size)
    opt = edgetl.OptimizerConfig.make("sgd", lr=args.lr, momentum=0.9)
    g = np.random.default_rng(0)
    x = g.random((args.batch, *pm.input_shape), dtype=np.float32)
    y = g.integers(0, pm.num_classes, args.batch)
    runs: dict[str, list[State]] = {}
    with tempfile.TemporaryDirectory(prefix="edgetl-f64-") as d:
        onnx = export(pm, "onnx", Path(d) / "onnx", opt, batch_size=args.batch)
        xn = normalize(x, json.loads((onnx / "manifest.json").read_text()))
        ref = torch_steps(pm, opt, xn, y, args.steps, torch.float64)
        runs["autograd f64"] = autograd_steps(pm, opt, xn, y, args.steps)
        runs["f64, f64 weights"] = torch_steps(pm, opt, xn, y, args.steps, torch.float64, fp32_weights=False)
        runs["torch fp32"] = torch_steps(pm, opt, xn, y, args.steps, torch.float32)
        runs["onnx"] = bundle_steps(onnx, x, y, args.steps, args.lr)
        for mib in args.limits:
            limit = int(mib * MiB)
            path = export_executorch(pm, opt, Path(d) / f"et{limit}", args.batch, limit)
            runs[f"ET bias sums <= {mib:g} MiB"] = bundle_steps(path, x, y, args.steps, args.lr)
    biases = conv_biases(pm)
    rows = []
    for name, states in runs.items():
        for i, (got, want) in enumerate(zip(states, ref)):
            errs = rel_errors(got, want)
            rows.append({"run": name, "step": i + 1, "groups": summary(errs, biases), "errors": errs})
            groups = rows[-1]["groups"].items()
            print(f"{name:24s} step {i + 1}: " + "; ".join(
                f"{g} median {v['median']:.2e} max {v['max']:.2e} ({v['worst']})" for g, v in groups), flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
