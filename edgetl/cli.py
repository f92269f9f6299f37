"""The host command line: `edgetl plan|export|data|fleet ...`."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgeTLError
from .runtime.targets import TARGET_NAMES, TARGETS, targets_help


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _model_args(p: argparse.ArgumentParser, planning: bool = False) -> None:
    p.add_argument("model", help="built-in backbone name or path/to/file.py:function")
    p.add_argument("--recipe", required=not planning, help="e.g. bias+mask, side, full, bias+last2"
                   + (" (several, comma-separated: each in turn; with --device/--budget-mb: only these are tried)"
                      if planning else ""))
    p.add_argument("--num-classes", "--classes", type=int, required=not planning, default=10 if planning else None)
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--input-shape", default=None,
                   help="one sample's shape, C,H,W or C,L (e.g. 3,96,128 or 1,16000); instead of --input-size")
    p.add_argument("--head", default=None, help="module path of the classifier head, when edgetl cannot tell")
    p.add_argument("--batch-size", type=int, default=None if planning else 8,
                   help="(plan: default 8; with --device/--budget-mb, only this batch is tried)" if planning else None)
    p.add_argument("--frozen-dtype", choices=["int8", "fp32"], default="int8")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None)
    no_momentum = ", ".join(t.name for t in TARGETS.values() if not t.sgd_momentum)
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SGD momentum (default 0.9; 0 for {no_momentum}, whose SGD has none)")


def _block_arg(p: argparse.ArgumentParser, planning: bool = False) -> None:
    p.add_argument("--weight-block-kb", type=float, default=None,
                   help="dequantize large frozen int8 weights in row blocks of at most this many KB of fp32, "
                        "not whole (microcontroller RAM; onnx and executorch targets)"
                   + (" (with a 'program' --device: 1/16 of its RAM unless given)" if planning else ""))


def _block_bytes(args) -> int | None:
    kb = getattr(args, "weight_block_kb", None)
    if kb is None:
        return None
    if not kb > 0:
        raise EdgeTLError(f"--weight-block-kb must be > 0, got {kb:g}")
    return max(1, int(kb * 1024))


def _optimizer(args):
    from .optim import OptimizerConfig

    kw = {}
    if args.optimizer == "sgd":
        # a target whose runtime's SGD has no momentum (ONNX Runtime's) defaults to none
        target = TARGETS.get(getattr(args, "target", None))
        default = 0.0 if target is not None and not target.sgd_momentum else 0.9
        kw["momentum"] = default if args.momentum is None else args.momentum
    return OptimizerConfig.make(args.optimizer, args.lr, **kw)


def _prepare(args, seed: int = 0):
    from .prepared import prepare

    shape = None if args.input_shape is None else _parse_shape(args.input_shape)
    return prepare(args.model, args.recipe, args.num_classes, args.input_size, args.frozen_dtype, seed,
                   input_shape=shape, head=args.head)


def cmd_plan_device(args) -> int:
    from .plan import plan, render

    if args.batch_size is not None and args.batch_size < 1:
        raise EdgeTLError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    shapes = None
    if args.input_shape is not None:
        if args.input_size is not None:
            raise EdgeTLError("give --input-size or --input-shape, not both")
        shapes = [_parse_shape(args.input_shape)]
    target = args.target
    p = plan(args.model, args.num_classes, args.device, args.budget_mb, target,
             recipes=[r.strip() for r in args.recipe.split(",") if r.strip()] if args.recipe else None,
             batches=[args.batch_size] if args.batch_size else None, input_shapes=shapes,
             input_size=args.input_size, head=args.head, weight_block_bytes=_block_bytes(args),
             optimizer=_optimizer(args) if args.optimizer != "sgd" or args.lr or args.momentum is not None else None)
    print(json.dumps(p.to_dict(), indent=2) if args.json else render(p))
    if p.chosen is None:
        print(f"edgetl: {p.nothing_fits}", file=sys.stderr)
        return 1
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise EdgeTLError(f"--input-shape must be C,H,W or C,L integers, got '{text}'") from None


def cmd_plan(args) -> int:
    if args.device is not None or args.budget_mb is not None:
        if args.micro_batch is not None:
            raise EdgeTLError("--micro-batch is for one recipe's memory (plan --recipe R without a budget); with "
                              "--device/--budget-mb the plan tries micro-batches itself")
        return cmd_plan_device(args)
    if args.recipe is None:
        raise EdgeTLError("give --recipe (one recipe's memory), or --device/--budget-mb (search recipes, "
                          "batches and input sizes that fit)")
    if args.batch_size is None:
        args.batch_size = 8
    if args.batch_size < 1:
        raise EdgeTLError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    _check_micro_batch(args)
    optimizer = _optimizer(args)
    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]  # `lora,bias+q8,side`: each in turn
    if not recipes:
        raise EdgeTLError(f"--recipe names no recipe: '{args.recipe}'")
    outs = []
    for i, recipe in enumerate(recipes):
        args.recipe = recipe
        outs.append(_plan_recipe(args, optimizer, first=i == 0))
    if args.json:
        print(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
    return 0


def _check_micro_batch(args) -> None:
    """--micro-batch: a positive divisor of --batch-size, for a target whose step takes micro-batches."""
    from .micro_batch import check_target

    mb = args.micro_batch
    if mb is not None and (mb < 1 or args.batch_size % mb):  # before the (long) prepare
        raise EdgeTLError(f"--micro-batch must be a positive divisor of --batch-size {args.batch_size}, got {mb}")
    target = TARGETS.get(getattr(args, "target", None))
    if mb is not None and target is not None:
        check_target(target, args.batch_size, mb)


def _plan_recipe(args, optimizer, first: bool) -> dict:
    """One recipe's analytic memory (printed unless --json), and where its kept memory goes; with
    --micro-batch M, of the step that takes M samples and accumulates (as `export --micro-batch M`)."""
    from .exporters import lowering
    from .micro_batch import accumulating

    pm = _prepare(args)
    block = _block_bytes(args)
    mb = args.micro_batch if args.micro_batch != args.batch_size else None
    step_opt = accumulating(pm, optimizer, args.batch_size, mb)
    # the step as the target's exporter lowers it: what its bundle's manifest reports (default: onnx)
    mem = pm.memory(mb or args.batch_size, step_opt, lowering(args.target or "onnx", block))
    out = {**pm.summary(), "batch_size": args.batch_size, **({"micro_batch": mb} if mb else {}),
           "analytic_peak_bytes": mem.analytic_peak_bytes,
           "breakdown": mem.breakdown(), **({"weight_block_bytes": block} if block else {})}
    if args.json:
        return out
    if not first:
        print()
    micro = f" in micro-batches of {mb} (one gradient accumulator per trainable, in the optimizer state)" if mb else ""
    print(f"{pm.name} · recipe {pm.recipe.text} · input {'×'.join(map(str, pm.input_shape))} · batch "
          f"{args.batch_size}{micro}")
    print(f"  trainable      {out['trainable_params']:,} of {out['total_params']:,} params "
          f"({100 * out['trainable_fraction']:.2f}%)")
    rows = [("frozen weights", mem.frozen_weights_bytes), ("trainable params", mem.trainable_params_bytes),
            ("gradients", mem.gradients_bytes), ("optimizer state", mem.optimizer_state_bytes),
            ("kept for backward", mem.kept_activations_bytes), ("analytic peak", mem.analytic_peak_bytes)]
    for name, v in rows:
        print(f"  {name:<17}{_human(v):>12}")
    print(f"  (peak reached at {mem.peak_at})")
    if block:
        print(f"  frozen weights dequantized in row blocks of at most {_human(block)}")
    if mem.kept_by_kind:
        print("  kept for backward, by what it is for:")
        for kind, v in sorted(mem.kept_by_kind.items(), key=lambda kv: -kv[1]):
            print(f"    {kind:<38}{_human(v):>12}  {100 * v / max(mem.kept_activations_bytes, 1):5.1f}%")
    return out


def _refuse_file_as_dir(path: str, flag: str) -> None:
    from pathlib import Path

    if Path(path).exists() and not Path(path).is_dir():
        raise EdgeTLError(f"{flag} '{path}' is an existing file; give a directory")


def cmd_export(args) -> int:
    from .exporters import export, refuse_current_dir
    from .runtime.signing import load_private_key

    _refuse_file_as_dir(args.out, "--out")
    refuse_current_dir(args.out)
    if args.sign_key is not None:
        load_private_key(args.sign_key)  # a bad key is reported before the (long) export
    optimizer = _optimizer(args)
    _check_micro_batch(args)
    mb = args.micro_batch
    pm = _prepare(args, args.seed)
    block = _block_bytes(args)
    out = export(pm, args.target, args.out, optimizer, args.batch_size, sign_key=args.sign_key,
                 weight_block_bytes=block, micro_batch=mb)
    s = pm.summary()
    signed = ", signed" if args.sign_key is not None else ""
    print(f"wrote {args.target} bundle to {out} ({s['trainable_params']:,} trainable of {s['total_params']:,} "
          f"params{signed})")
    return 0


def cmd_keygen(args) -> int:
    from .runtime.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(args.out, args.name)
    print(f"wrote {priv} (private: keep it on the host, mode 0600) and {pub} (for the device: --trusted-key); "
          f"key id {key_id(load_public_key(pub))}")
    return 0


def cmd_data(args) -> int:
    from .datasets import load_dataset, save_npz
    from .runtime import load_bundle
    from .runtime.bundle import inside

    from pathlib import Path

    if Path(args.out).is_dir():
        raise EdgeTLError(f"--out '{args.out}' is a directory; give a file name such as data.npz")
    bundle = load_bundle(args.bundle)
    if len(bundle.input_shape) != 3:
        raise EdgeTLError(f"the bundle takes {'×'.join(map(str, bundle.input_shape))} signals; the datasets "
                          "`edgetl data` writes are images")
    out = args.out if str(args.out).endswith(".npz") else f"{args.out}.npz"  # what np.savez writes
    if inside(bundle.root, out):
        raise EdgeTLError(f"--out '{out}' is inside the bundle '{bundle.root}'; write the data elsewhere "
                          f"(the bundle's files are never overwritten)")
    c, h, w = bundle.input_shape
    ds = load_dataset(args.name, input_size=h, channels=c, seed=args.seed)
    if ds.num_classes > bundle.num_classes:
        raise EdgeTLError(f"dataset '{args.name}' has {ds.num_classes} classes but the bundle's head has "
                          f"{bundle.num_classes}; export with --num-classes {ds.num_classes}")
    save_npz(ds, out)
    print(f"wrote {out}: {len(ds.x_train)} train / {len(ds.x_test)} test images of {c}×{h}×{w}, "
          f"{ds.num_classes} classes")
    return 0


def cmd_validate(args) -> int:
    from .validate import main_validate

    return main_validate(args)


def _validate_parser(sub) -> None:
    v = sub.add_parser("validate", help="run a bundle's step in torch on CUDA/CPU and check parity with the runtime")
    v.add_argument("bundle")
    v.add_argument("--data", required=True,
                   help=".npz with x_train, y_train, x_test, y_test (e.g. from `edgetl data`), or a built-in dataset")
    v.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (CPU is used, with a warning, without CUDA)")
    v.add_argument("--epochs", type=int, default=1, help="training passes on the device (0: parity only)")
    v.add_argument("--steps", type=int, default=5, help="steps compared with the on-device runtime")
    v.add_argument("--seed", type=int, default=0, help="shuffling seed, as `fit --seed`")
    v.add_argument("--init-seed", type=int, default=None, help="seed the bundle was exported with (default 0)")
    v.add_argument("--lr", type=float, default=None, help="constant learning rate (default: the bundle's)")
    v.add_argument("--model", default=None, help="backbone spec, if the manifest's model name is not loadable")
    v.add_argument("--tolerance", type=float, default=1e-4, help="max relative parameter error")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_validate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="Transfer learning on the device.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="analytic training memory of a recipe, or (--device/--budget-mb) the recipe, "
                       "batch and input size with the most trainable capacity that fits")
    _model_args(p, planning=True)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--device", default=None, help="a named device profile (runtime/devices.json)")
    budget.add_argument("--budget-mb", type=float, default=None, help="memory the whole training process may use")
    p.add_argument("--target", choices=TARGET_NAMES, default=None,
                   help="the runtime (default: the device's, or onnx)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="with --recipe (no budget): the memory of the step that takes this many samples per call, "
                        "dividing --batch-size, as `export --micro-batch` exports it")
    _block_arg(p, planning=True)
    p.set_defaults(func=cmd_plan)
    e = sub.add_parser("export", help="export an on-device training bundle")
    _model_args(e)
    e.add_argument("--target", required=True, choices=TARGET_NAMES, help=f"the device runtime: {targets_help()}")
    _block_arg(e)
    e.add_argument("--micro-batch", type=int, default=None,
                   help="samples per call of the step, dividing --batch-size: the step accumulates gradients "
                        "over batch-size/micro-batch calls, one optimizer step per batch (less memory; targets: "
                        + ", ".join(t.name for t in TARGETS.values() if t.micro_batches) + ")")
    e.add_argument("--seed", type=int, default=0, help="initialisation of new parts (head, side network)")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--sign-key", default=None, help="sign the bundle with this Ed25519 private key (edgetl keygen)")
    e.set_defaults(func=cmd_export)
    k = sub.add_parser("keygen", help="write an Ed25519 key pair for signing bundles")
    k.add_argument("--out", required=True, help="directory for NAME.key (private, 0600) and NAME.pub (device)")
    k.add_argument("--name", default="edgetl-signing", help="file name stem of the two keys")
    k.set_defaults(func=cmd_keygen)
    d = sub.add_parser("data", help="write a built-in dataset as .npz, preprocessed for a bundle's input")
    d.add_argument("name", help="digits, digits-affine, textures, faces, or a path to an .npz")
    d.add_argument("--bundle", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)
    _validate_parser(sub)
    from .fleet.cli import add_parser as _fleet_parser

    _fleet_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EdgeTLError, ValueError) as e:
        print(f"edgetl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("edgetl: error: out of memory", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an --out that cannot be written
        where = f": '{e.filename}'" if getattr(e, "filename", None) else ""
        print(f"edgetl: error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2


def _one_line(text) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":
    sys.exit(main())
