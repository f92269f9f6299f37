"""The device command line, torch-free:

    python -m edgetl.runtime fit BUNDLE --data FILE.npz --epochs N --json
    python -m edgetl.runtime evaluate BUNDLE --data FILE.npz [--checkpoint CKPT] --json
    python -m edgetl.runtime export-inference BUNDLE [--checkpoint CKPT] --out PATH
"""
from __future__ import annotations

import argparse
import json
import resource
import sys

from .notorch import block_torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(args):
    from .trainer import Trainer

    t = Trainer.load(args.bundle)
    if args.checkpoint and args.command != "fit":  # fit resumes from its checkpoint by itself
        t.load_checkpoint(args.checkpoint)
    return t


def cmd_fit(args) -> dict:
    import numpy as np

    from .data import load_npz

    data = load_npz(args.data)
    t = _trainer(args)
    r = t.fit(data["x_train"], data["y_train"], epochs=args.epochs, lr=args.lr, schedule=args.schedule,
              seed=args.seed, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
              progress=not args.no_progress)
    train = t.evaluate(data["x_train"], data["y_train"])
    test = t.evaluate(data["x_test"], data["y_test"])
    return {"target": t.bundle.target, "model": t.bundle.manifest["model"], "recipe": t.bundle.manifest["recipe"],
            "steps": r.steps, "final_loss": r.final_loss, "train_accuracy": train["accuracy"],
            "test_accuracy": test["accuracy"], "test_loss": test["loss"], "step_ms_median": r.step_ms_median,
            "step_ms_min": float(np.min(r.step_ms)) if r.step_ms else None,
            "peak_rss_mb": _peak_rss_mb()}


def cmd_evaluate(args) -> dict:
    from .data import load_npz

    data = load_npz(args.data)
    t = _trainer(args)
    return {"split": args.split, **t.evaluate(data[f"x_{args.split}"], data[f"y_{args.split}"]),
            "peak_rss_mb": _peak_rss_mb()}


def cmd_export_inference(args) -> dict:
    t = _trainer(args)
    files = t.export_inference(args.out)
    return {"files": [str(f) for f in files], "step": t.step}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgetl.runtime", description="edgetl on-device runtime (no torch)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train a bundle on x_train/y_train of an .npz")
    f.add_argument("bundle")
    f.add_argument("--data", required=True)
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--checkpoint", default=None, help="save here each epoch; resume from it if it exists")
    f.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: each epoch)")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_fit)
    e = sub.add_parser("evaluate", help="loss and accuracy on a split of an .npz")
    e.add_argument("bundle")
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--split", choices=["test", "train"], default="test")
    e.set_defaults(func=cmd_evaluate)
    x = sub.add_parser("export-inference", help="write the trained model as an inference program")
    x.add_argument("bundle")
    x.add_argument("--checkpoint", default=None)
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export_inference)
    for s in (f, e, x):
        s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    block_torch()
    args = build_parser().parse_args(argv)
    from .errors import EdgeRuntimeError

    try:
        out = args.func(args)
    except EdgeRuntimeError as err:
        print(f"edgetl.runtime: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
