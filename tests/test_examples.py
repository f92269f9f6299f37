"""The example scripts run as a user would run them (subprocess, fast defaults: mnist_cnn)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("examples")
    r = _run("export_for_device.py", "onnx", "--out", work / "bundle", "--data-out", work / "digits.npz", cwd=work)
    return work, r


def test_export_for_device_prints_the_plan_and_writes_a_bundle(exported):
    work, r = exported
    assert "recipe bias+mask" in r.stdout and "trainable" in r.stdout and "analytic peak" in r.stdout
    assert (work / "bundle" / "manifest.json").is_file() and (work / "bundle" / "train_step.onnx").is_file()
    assert (work / "digits.npz").is_file()


def test_fit_on_device_trains_without_torch(exported):
    work, _ = exported
    r = _run("fit_on_device.py", work / "bundle", "--data", work / "digits.npz", "--epochs", "1",
             "--checkpoint", work / "ckpt.npz", cwd=work)
    m = re.search(r"test accuracy: [\d.]+% before, ([\d.]+)% after", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) > 90
    assert (work / "ckpt.npz").is_file()
    model = work / "model.onnx"
    assert model.is_file() and model.stat().st_size > 0
    import numpy as np
    import onnxruntime as ort

    z = np.load(work / "digits.npz")
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": z["x_test"]})[0]
    assert (logits.argmax(1) == z["y_test"]).mean() > 0.9  # the exported model is the trained one


def test_profile_memory_writes_a_png(tmp_path):
    out = tmp_path / "memory.png"
    r = _run("profile_memory.py", "--recipes", "head,bias+mask,side,full", "--out", out, cwd=tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "analytic peak" in r.stdout
    peaks = dict(zip(["head", "bias+mask", "side", "full"],
                     map(float, next(l for l in r.stdout.splitlines() if "analytic peak" in l).split()[2:])))
    assert peaks["full"] > peaks["bias+mask"] > peaks["head"]
