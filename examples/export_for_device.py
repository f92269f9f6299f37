"""Prepare a pretrained model with a recipe, print its training plan, and export an on-device
training bundle for a target (onnx, ort-training or executorch).

    python examples/export_for_device.py onnx --model mnist_cnn --recipe bias+mask --out out/bundle

It also writes the matching dataset (`--data digits`, preprocessed for the bundle's input) so that
examples/fit_on_device.py can train the bundle right away.
"""
import argparse
from pathlib import Path

import edgetl
from edgetl.datasets import load_dataset, save_npz
from edgetl.exporters import TARGETS, export


def mb(n: float) -> str:
    return f"{n / 2**20:8.2f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", nargs="?", default="onnx", choices=TARGETS)
    p.add_argument("--model", default="mnist_cnn", help="built-in backbone or path/to/file.py:function")
    p.add_argument("--recipe", default="bias+mask", help="e.g. head, bias+mask, side, bias+last1, full")
    p.add_argument("--data", default="digits", help="digits, digits-affine, textures, faces, a user .npz, or 'none'")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="initialisation of the new head / side network")
    p.add_argument("--out", default="out/bundle", help="bundle directory to write")
    p.add_argument("--data-out", default="out/data.npz", help="where the preprocessed dataset goes")
    args = p.parse_args()

    # 1. The dataset decides the number of classes; it is resized to the model's input.
    bb = edgetl.load_backbone(args.model)
    size = args.input_size or bb.input_size
    ds = None
    if args.data != "none":
        ds = load_dataset(args.data, input_size=size, channels=bb.in_channels)
    num_classes = ds.num_classes if ds is not None else bb.num_classes

    # 2. Prepare: BN folded, frozen weights int8, a new head, the recipe's trainable parts.
    pm = edgetl.prepare(bb, args.recipe, num_classes=num_classes, input_size=size, seed=args.seed)
    # ONNX Runtime's own on-device SGD (ort-training) has no momentum.
    momentum = 0.0 if args.target == "ort-training" else 0.9
    opt = edgetl.OptimizerConfig.make("sgd", lr=args.lr, momentum=momentum)

    # 3. The plan: what trains and what one training step needs in memory (analytic model).
    s = pm.summary()
    mem = pm.memory(args.batch_size, opt)
    print(f"{s['model']} · recipe {s['recipe']} · input {size}×{size} · batch {args.batch_size} · "
          f"{num_classes} classes · target {args.target}")
    print(f"  trainable          {s['trainable_params']:,} of {s['total_params']:,} params "
          f"({100 * s['trainable_fraction']:.2f}%), frozen as {s['frozen_dtype']}")
    for name, v in [("frozen weights", mem.frozen_weights_bytes), ("trainable params", mem.trainable_params_bytes),
                    ("optimizer state", mem.optimizer_state_bytes), ("input batch", mem.input_bytes),
                    ("kept for backward", mem.kept_activations_bytes), ("analytic peak", mem.analytic_peak_bytes)]:
        print(f"  {name:<18}{mb(v)}")

    # 4. Export the bundle (programs + initial state + checksummed manifest) and the data.
    out = export(pm, args.target, args.out, opt, batch_size=args.batch_size)
    files = sorted(f.name for f in Path(out).iterdir())
    print(f"wrote {args.target} bundle {out}: {', '.join(files)}")
    if ds is not None:
        Path(args.data_out).parent.mkdir(parents=True, exist_ok=True)
        save_npz(ds, args.data_out)
        print(f"wrote {args.data_out}: {len(ds.x_train)} train / {len(ds.x_test)} test images")
        print(f"next: python examples/fit_on_device.py {out} --data {args.data_out}")


if __name__ == "__main__":
    main()
