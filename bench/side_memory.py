"""Ladder side-tuning (`side`) against `lora` and `full` on a DeiT-like vision transformer: the analytic
memory of one lean step (what is kept for backward, and the step's peak) beside the peak the device
profiler measures for the exported `onnx` step, each recipe profiled in its own process
(`python -m edgetl.runtime profile --json`, glibc returning freed blocks to the system), as
tests/test_memory.py does. Prints a markdown table and writes bench/results/side_memory.json.

    python bench/side_memory.py                          # DeiT-like 64×64, patch 8, dim 192, 6 blocks, batch 8
    python bench/side_memory.py --img 224 --patch 16 --depth 12   # DeiT-Tiny's geometry (slow to export here)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "side_memory.json"
RECIPES = ["side", "lora", "full"]
MB = 2**20


def deit(img: int, patch: int, dim: int, depth: int, heads: int):
    """tests/families' DeiT-like model (class token, position embedding, fused and explicit attention),
    with `depth` blocks."""
    sys.path.insert(0, str(ROOT / "tests"))
    from torch import nn

    from families._common import build
    from families._vit_layers import Block, randomize_norms
    from families.deit import DeiTLike

    def make():
        model = DeiTLike(10, img=img, patch=patch, dim=dim, heads=heads)
        model.blocks = nn.Sequential(*[Block(dim, heads, fused=i % 2 == 0, mlp_ratio=4.0) for i in range(depth)])
        randomize_norms(model)
        return model

    return build(make, (3, img, img))


def run(args) -> list[dict]:
    import edgetl
    from edgetl.exporters import export

    model = deit(args.img, args.patch, args.dim, args.depth, args.heads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            pm = edgetl.prepare(model, recipe, num_classes=10, input_shape=model.input_shape)
            bundle = export(pm, "onnx", Path(tmp) / recipe, batch_size=args.batch)
            r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "3",
                                "--json"], capture_output=True, text=True, timeout=1800)
            if r.returncode:
                raise SystemExit(r.stderr)
            prof = json.loads(r.stdout)
            mem = pm.memory(args.batch)
            rows.append({"recipe": recipe, "trainable_params": pm.graph.trainable_params(),
                         "kept_bytes": mem.kept_activations_bytes, "analytic_peak_bytes": mem.analytic_peak_bytes,
                         "analytic_step_bytes": prof["analytic_step_bytes"],
                         "measured_peak_bytes": prof["measured_peak_bytes"],
                         "measured_vs_analytic": prof["measured_vs_analytic"], "notes": pm.notes.get("side")})
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['recipe']} | {r['trainable_params']:,} | {r['kept_bytes'] / MB:.2f} | "
            f"{r['analytic_step_bytes'] / MB:.2f} | {r['measured_peak_bytes'] / MB:.2f} | "
            f"{r['measured_vs_analytic']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args()
    args.recipes = args.recipes.split(",")
    print(f"DeiT-like {args.img}×{args.img}, patch {args.patch}, dim {args.dim}, {args.depth} blocks, "
          f"batch {args.batch}, onnx target\n")
    print("| recipe | trainable params | kept (analytic, MB) | step peak analytic (MB) | measured (MB) | "
          "measured / analytic |\n|---|---|---|---|---|---|")
    rows = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
