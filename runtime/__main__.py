"""The device command line, torch-free:

    python -m edgetl.runtime fit BUNDLE --data FILE.npz --epochs N --json
    python -m edgetl.runtime evaluate BUNDLE --data FILE.npz [--checkpoint CKPT] --json
    python -m edgetl.runtime export-inference BUNDLE [--checkpoint CKPT] --out PATH
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys

from .notorch import block_torch
from .targets import CONTRACT, targets_help


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(args):
    from .trainer import Trainer

    t = Trainer.load(args.bundle, trusted_key=args.trusted_key)
    if args.checkpoint and args.command != "fit":  # fit resumes from its checkpoint by itself
        t.load_checkpoint(args.checkpoint)
    return t


def cmd_fit(args) -> dict:
    import numpy as np

    from .data import check_images, check_labels, load_npz
    from .errors import InputError

    if args.checkpoint_every > 0 and not args.checkpoint:
        raise InputError("--checkpoint-every needs --checkpoint (the file to save to)")
    data = load_npz(args.data)
    t = _trainer(args)
    # bad test data is refused before training, not after it
    check_labels(data["y_test"], len(check_images(data["x_test"], t.bundle.input_shape, "x_test")),
                 t.bundle.num_classes, "y_test")
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


def cmd_profile(args) -> dict:
    """Memory from a child run with the memory setting, step time from a run with the default
    allocator (runtime/profile.py says why); a child run (EDGETL_PROFILE_PART) reports its own part."""
    import os

    from . import profile as pf
    from .bundle import inside
    from .errors import InputError

    if args.plot:
        pf.check_plot_path(args.plot)  # before the measurement, not after it
    pf.resolve_budget(args.device, args.budget_mb)  # an unknown device is refused before measuring
    t = _trainer(args)
    if args.plot and inside(t.bundle.root, args.plot):
        raise InputError(f"--plot '{args.plot}' is inside the bundle '{t.bundle.root}'; write the plot elsewhere "
                         f"(the bundle's files are never overwritten)")
    pf.check_profilable(t, args.steps, args.warmup)
    part = os.environ.get(pf.PART_VAR)
    if part is not None:
        return pf.label_run(pf.profile_trainer(t, args.steps, warmup=args.warmup), part, "child").to_dict()
    child_args = [args.bundle, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--trusted-key", args.trusted_key)):
        if value is not None:
            child_args += [flag, value]
    prefix = pf.child_command(getattr(args, "runtime_argv", None))
    memory = pf.run_part("memory", prefix, child_args, {**pf.default_allocator_env(), **pf.MEMORY_SETTING})
    if pf.allocator() == "default":
        p = pf.label_run(pf.profile_trainer(t, args.steps, warmup=args.warmup), "time", "this")
    else:  # this process has an allocator setting: time a child without it
        p = pf.Profile(**pf.run_part("time", prefix, child_args, pf.default_allocator_env()))
    p = pf.apply_budget(pf.with_memory_from(p, memory), args.device, args.budget_mb,
                        pf.program_files_bytes(t.bundle))
    out = p.to_dict()
    if args.plot:
        out["plot"] = str(pf.plot_profile(p, args.plot))
    return out


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (like every other error here)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _finite(value):
    """`value` with every non-finite float as None: the JSON output is strict JSON (no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr."""
    print(f"edgetl.runtime: warning: {_one_line(message)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m edgetl.runtime", description="edgetl on-device runtime (no torch); it runs "
                f"bundles of the targets {targets_help()} (the bundle's manifest names its target)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train a bundle on x_train/y_train of an .npz")
    f.add_argument("bundle")
    f.add_argument("--data", required=True)
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--schedule", choices=CONTRACT["checkpoint"]["schedules"], default="constant")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--checkpoint", default=None, help="save here each epoch (the previous save is kept as "
                   "CHECKPOINT.prev); resume from it if it exists")
    f.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: each epoch); needs --checkpoint")
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
    pr = sub.add_parser("profile", help="measure training memory and step time against a device budget")
    pr.add_argument("bundle")
    pr.add_argument("--steps", type=int, default=5)
    pr.add_argument("--warmup", type=int, default=1, help="steps run before measuring (lazy set-up is resident)")
    pr.add_argument("--checkpoint", default=None)
    budget = pr.add_mutually_exclusive_group()
    budget.add_argument("--device", default=None, help="a named device profile (see runtime/devices.json)")
    budget.add_argument("--budget-mb", type=float, default=None)
    pr.add_argument("--plot", default=None, help="write a PNG of the breakdown here")
    pr.set_defaults(func=cmd_profile)
    for s in (f, e, x, pr):
        s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        s.add_argument("--trusted-key", default=None,
                       help="only load a bundle signed by this Ed25519 public key (*.pub); default $EDGETL_TRUSTED_KEY")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.runtime_argv = sys.argv[1:] if argv is None else list(argv)
    block_torch()
    import warnings

    from .errors import EdgeRuntimeError

    warnings.showwarning = _show_notice

    try:
        out = args.func(args)
    except EdgeRuntimeError as err:
        print(f"edgetl.runtime: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an --out path that cannot be written
        where = f": '{err.filename}'" if getattr(err, "filename", None) else ""
        print(f"edgetl.runtime: error: {_one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetl.runtime: interrupted", file=sys.stderr)
        return 130
    out = _finite(out)
    if args.json:
        print(json.dumps(out, allow_nan=False))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
