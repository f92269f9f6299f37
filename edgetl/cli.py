"""The host command line: `edgetl plan|export|data ...`."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgeTLError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in backbone name or path/to/file.py:function")
    p.add_argument("--recipe", required=True, help="e.g. bias+mask, side, full, bias+last2")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frozen-dtype", choices=["int8", "fp32"], default="int8")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None)


def cmd_plan(args) -> int:
    from .optim import OptimizerConfig
    from .prepared import prepare

    if args.batch_size < 1:
        raise EdgeTLError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    pm = prepare(args.model, args.recipe, args.num_classes, args.input_size, args.frozen_dtype)
    mem = pm.memory(args.batch_size, OptimizerConfig.make(args.optimizer, args.lr))
    out = {**pm.summary(), "batch_size": args.batch_size, "analytic_peak_bytes": mem.analytic_peak_bytes,
           "breakdown": mem.breakdown()}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{pm.name} · recipe {pm.recipe.text} · input {pm.input_size}×{pm.input_size} · batch {args.batch_size}")
    print(f"  trainable      {out['trainable_params']:,} of {out['total_params']:,} params "
          f"({100 * out['trainable_fraction']:.2f}%)")
    rows = [("frozen weights", mem.frozen_weights_bytes), ("trainable params", mem.trainable_params_bytes),
            ("gradients", mem.gradients_bytes), ("optimizer state", mem.optimizer_state_bytes),
            ("kept for backward", mem.kept_activations_bytes), ("analytic peak", mem.analytic_peak_bytes)]
    for name, v in rows:
        print(f"  {name:<17}{_human(v):>12}")
    print(f"  (peak reached at {mem.peak_at})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="Transfer learning on the device.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="trainable parameters and analytic training memory of a recipe")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeTLError as e:
        print(f"edgetl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
