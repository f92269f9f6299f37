"""Train an exported bundle the way a device does: no PyTorch, only numpy and the runtime.

    python examples/fit_on_device.py out/bundle --data out/data.npz --epochs 3

Fits on x_train/y_train of the .npz, evaluates on x_test/y_test, saves a checkpoint (a later
fit(..., checkpoint=...) resumes from it) and writes the trained model as an inference program.
"""
import argparse
import sys
from pathlib import Path

from edgetl.runtime.notorch import block_torch

block_torch()  # from here on `import torch` fails: this script is proof that the device side needs none

from edgetl.runtime import Trainer  # noqa: E402
from edgetl.runtime.data import load_npz  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", default="out/bundle")
    p.add_argument("--data", default="out/data.npz", help=".npz with x_train, y_train, x_test, y_test in [0, 1]")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: the bundle's")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--seed", type=int, default=0, help="shuffling")
    p.add_argument("--checkpoint", default="out/checkpoint.safetensors")
    p.add_argument("--model-out", default=None, help="inference program (default out/model.onnx, or .pte)")
    args = p.parse_args()

    data = load_npz(args.data)
    trainer = Trainer.load(args.bundle)
    b = trainer.bundle
    print(f"bundle: {b.manifest['model']} · {b.manifest['recipe']} · {b.target} · batch {b.batch_size}")

    before = trainer.evaluate(data["x_test"], data["y_test"])
    result = trainer.fit(data["x_train"], data["y_train"], epochs=args.epochs, lr=args.lr,
                         schedule=args.schedule, seed=args.seed, progress=True)
    after = trainer.evaluate(data["x_test"], data["y_test"])
    print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.step_ms_median:.1f} ms/step (median)")
    print(f"test accuracy: {100 * before['accuracy']:.1f}% before, {100 * after['accuracy']:.1f}% after "
          f"({after['n']} images)")

    ckpt = trainer.save_checkpoint(args.checkpoint)
    print(f"saved checkpoint {ckpt}")
    default = Path(args.checkpoint).with_name("model.pte" if b.target == "executorch" else "model.onnx")
    files = trainer.export_inference(args.model_out or default)
    print(f"wrote inference model: {', '.join(map(str, files))}")
    assert "torch" not in sys.modules


if __name__ == "__main__":
    main()
