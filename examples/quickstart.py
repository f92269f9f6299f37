"""The main job: export real pretrained models with an int8 backbone and a bias+mask recipe,
train them with the torch-free device runtime on real data, print accuracy and memory.

    python examples/quickstart.py [--out DIR]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import edgetl
from edgetl.datasets import load_dataset, save_npz
from edgetl.exporters import export

JOBS = [  # model, recipe, dataset, input size, batch, epochs, lr
    ("mnist_cnn", "bias+mask", "digits", 28, 32, 3, 0.05),
    ("efficientnet_lite0", "bias+mask", "textures", 96, 16, 2, 0.02),
]


def device(*args: str) -> dict:
    """Run the device runtime in its own process: it blocks torch, as on a device without it."""
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", *args, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return json.loads(r.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/quickstart")
    out = Path(p.parse_args().out)
    for model, recipe, data, size, batch, epochs, lr in JOBS:
        ds = load_dataset(data, input_size=size, channels=3 if model != "mnist_cnn" else 1)
        pm = edgetl.prepare(model, recipe, num_classes=ds.num_classes, input_size=size)
        s = pm.summary()
        bundle = export(pm, "onnx", out / f"{model}-bundle", edgetl.OptimizerConfig.make("sgd", lr=lr), batch)
        save_npz(ds, out / f"{data}.npz")
        print(f"\n{model} → {data}: recipe {recipe}, {s['trainable_params']:,} of {s['total_params']:,} params "
              f"train ({100 * s['trainable_fraction']:.2f}%), int8 frozen backbone; bundle {bundle}")
        fit = device("fit", str(bundle), "--data", str(out / f"{data}.npz"), "--epochs", str(epochs), "--no-progress")
        prof = device("profile", str(bundle), "--device", "phone-low-2gb")
        print(f"  on-device runtime (onnxruntime, no torch): {fit['steps']} steps, "
              f"test accuracy {100 * fit['test_accuracy']:.1f}% (train {100 * fit['train_accuracy']:.1f}%), "
              f"{fit['step_ms_median']:.0f} ms/step")
        print(f"  training memory (batch {batch}): measured {prof['measured_peak_bytes'] / 2**20:.1f} MB above the "
              f"pre-step level, analytic {prof['analytic_step_bytes'] / 2**20:.1f} MB; whole process "
              f"{prof['process_peak_bytes'] / 2**20:.0f} MB → fits a 2 GB phone's budget: {prof['fits']}")


if __name__ == "__main__":
    main()
