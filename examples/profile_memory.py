"""Where a training step's memory goes, per recipe: a stacked bar chart (PNG) of the analytic
memory model's breakdown at the step's peak, and a table on stdout.

    python examples/profile_memory.py --model mnist_cnn --batch-size 32 --out out/memory.png
    python examples/profile_memory.py --model efficientnet_lite0 --input-size 128 --batch-size 8

With --measure, each recipe is also exported (onnx target) and profiled for real by the device
runtime (`python -m edgetl.runtime profile`); the measured peaks are drawn as markers.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import edgetl  # noqa: E402

RESIDENT = [("frozen weights", "frozen_weights_bytes"), ("trainable params", "trainable_params_bytes"),
            ("optimizer state", "optimizer_state_bytes"), ("input batch", "input_bytes")]
ORDER = ["kept for backward", "activations (flowing)", "gradients (flowing)", "parameter gradients",
         "weights (dequantized, transient)", "temporaries"]  # the live set's kinds, bottom to top


def breakdown(pm, batch_size: int, opt) -> dict[str, float]:
    """MB per part at the analytic peak: what is resident for the whole step, plus the live set
    at the peak by kind (kept for backward, flowing activations and gradients, temporaries...)."""
    b = pm.memory(batch_size, opt).breakdown()
    parts = {name: b[key] for name, key in RESIDENT}
    parts.update(b["peak_by_kind"])
    assert abs(sum(parts.values()) - b["analytic_peak_bytes"]) <= 1, "breakdown does not add up to the peak"
    return {k: v / 2**20 for k, v in parts.items()}


def measure(pm, batch_size: int, opt, work: Path) -> float | None:
    """Measured peak (MB) of real steps in the device runtime, on the analytic chart's footing."""
    from edgetl.exporters import export

    bundle = export(pm, "onnx", work / pm.recipe.text.replace("+", "_"), opt, batch_size=batch_size)
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "3", "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  (measuring {pm.recipe.text} failed: {r.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    p = json.loads(r.stdout)
    resident = p["analytic_peak_bytes"] - p["analytic_step_bytes"]  # frozen + params + state: before the step
    return (resident + p["measured_peak_bytes"]) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--recipes", default="head,bias,bias+mask,side,side+mask,bias+last1,full")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="out/memory.png")
    p.add_argument("--measure", action="store_true", help="also measure each recipe in the device runtime")
    args = p.parse_args()

    opt = edgetl.OptimizerConfig.make("sgd", lr=0.01, momentum=0.9)
    bb = edgetl.load_backbone(args.model)
    recipes = args.recipes.split(",")
    rows, measured = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in recipes:
            pm = edgetl.prepare(bb, r, num_classes=args.num_classes, input_size=args.input_size)
            rows[r] = breakdown(pm, args.batch_size, opt)
            if args.measure:
                measured[r] = measure(pm, args.batch_size, opt, Path(tmp))
    size = pm.input_size

    seen = {k for parts in rows.values() for k in parts}
    kinds = [name for name, _ in RESIDENT] + [k for k in ORDER if k in seen]
    kinds += sorted(seen - set(kinds))
    width = max(12, *(len(r) + 2 for r in recipes))
    print(f"{args.model}, input {size}×{size}, batch {args.batch_size}: analytic training peak, MB")
    print(f"{'':<34}" + "".join(f"{r:>{width}}" for r in recipes))
    for k in kinds:
        print(f"  {k:<32}" + "".join(f"{rows[r].get(k, 0.0):{width}.2f}" for r in recipes))
    print(f"  {'analytic peak':<32}" + "".join(f"{sum(rows[r].values()):{width}.2f}" for r in recipes))
    if measured:
        print(f"  {'measured peak (onnxruntime)':<32}"
              + "".join(f"{measured[r]:{width}.2f}" if measured[r] is not None else f"{'-':>{width}}" for r in recipes))

    fig, ax = plt.subplots(figsize=(1.3 * len(recipes) + 4, 4.5))
    bottom = [0.0] * len(recipes)
    for k in kinds:
        vals = [rows[r].get(k, 0.0) for r in recipes]
        ax.bar(recipes, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if measured:
        pts = [(i, v) for i, v in enumerate(measured[r] for r in recipes) if v is not None]
        ax.scatter([i for i, _ in pts], [v for _, v in pts], marker="_", s=600, color="black", zorder=3,
                   label="measured (onnxruntime)")
    ax.set_ylabel("MB")
    ax.set_title(f"{args.model} {size}×{size}, batch {args.batch_size}: training memory at the step's peak",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
