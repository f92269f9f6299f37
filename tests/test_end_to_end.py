"""Export on the host, train on the device runtime in a torch-free process, for the onnx and
ort-training targets (executorch: test_executorch.py)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgetl
from edgetl.exporters import export
from edgetl.runtime import Trainer

DEVICE_KEYS = {"steps", "final_loss", "train_accuracy", "test_accuracy", "step_ms_median", "peak_rss_mb"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from edgetl.datasets import load_dataset, save_npz

    path = tmp_path_factory.mktemp("data") / "digits.npz"
    save_npz(load_dataset("digits", input_size=28, channels=1), path)
    return path


@pytest.mark.parametrize("target,momentum", [("onnx", 0.9), ("ort-training", 0.0)])
def test_mnist_bias_mask_fits_digits_on_device(tmp_path, digits, target, momentum):
    bundle = tmp_path / "bundle"
    r = _run("-m", "edgetl", "export", "mnist_cnn", "--recipe", "bias+mask", "--target", target, "--num-classes",
             "10", "--batch-size", "32", "--lr", "0.05", "--momentum", str(momentum), "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    r = _run("-m", "edgetl.runtime", "fit", str(bundle), "--data", str(digits), "--epochs", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert DEVICE_KEYS <= set(out)
    assert out["steps"] == 3 * (1257 // 32)
    assert out["test_accuracy"] >= 0.95
    assert "fit [" in r.stderr  # the progress bar


def test_device_process_has_no_torch(tmp_path, digits):
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10)
    bundle = export(pm, "onnx", tmp_path / "b", batch_size=16)
    code = (
        "from edgetl.runtime.notorch import block_torch; block_torch()\n"
        "import sys, numpy as np\n"
        "from edgetl.runtime import Trainer\n"
        f"z = np.load({str(digits)!r})\n"
        f"t = Trainer.load({str(bundle)!r}); t.fit(z['x_train'][:64], z['y_train'][:64])\n"
        "try:\n    import torch\nexcept ImportError:\n    print('no torch')\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    )
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "no torch" in r.stdout


def test_runtimes_agree_with_the_torch_step(tmp_path):
    """Same 5 batches from the same state: onnx and ort-training params match the torch lean step."""
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.0)
    g = np.random.default_rng(0)
    batches = [(g.random((8, 1, 28, 28), dtype=np.float32), g.integers(0, 10, 8)) for _ in range(5)]
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    mean, std = pm.mean[0], pm.std[0]
    for x, y in batches:
        xt = torch.from_numpy((x - mean) / std)
        _, _, params, state, _ = step.run(xt, torch.from_numpy(y), opt.lr, params, state)
    for target in ("onnx", "ort-training"):
        t = Trainer.load(export(pm, target, tmp_path / target, opt, batch_size=8))
        for x, y in batches:
            t._train_step(t._x(x), y.astype(np.int64))
        got = t.backend.get_state()
        for name in pm.trainable:
            ref = params[name].numpy()
            err = np.abs(got[name] - ref).max() / (np.abs(ref).max() + 1e-12)
            assert err < 1e-4, (target, name, err)


@pytest.mark.parametrize("target", ["onnx", "ort-training"])
def test_inference_program_predicts_like_the_trainer(tmp_path, digits, target):
    import onnxruntime as ort

    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.0)
    t = Trainer.load(export(pm, target, tmp_path / "b", opt, batch_size=32))
    z = np.load(digits)
    t.fit(z["x_train"], z["y_train"], epochs=1)
    (path,) = t.export_inference(tmp_path / "model.onnx")
    if target == "onnx":  # written by the runtime's own protobuf writer, without the onnx package
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = z["x_test"]
    if target == "ort-training":  # ORT's exported graph takes normalised input
        x = ((x - pm.mean[0]) / pm.std[0]).astype(np.float32)
    pred = sess.run(["logits"], {"x": x})[0].argmax(1)
    assert (pred == t.predict(z["x_test"])).all()


@pytest.mark.parametrize("recipe", ["bias+mask", "side"])
def test_efficientnet_lite0_learns_textures(tmp_path, recipe):
    from edgetl.datasets import load_dataset

    pm = edgetl.prepare("efficientnet_lite0", recipe, num_classes=3, input_size=64)
    t = Trainer.load(export(pm, "onnx", tmp_path / "b", edgetl.OptimizerConfig.make("sgd", lr=0.02), batch_size=16))
    ds = load_dataset("textures", input_size=64, channels=3)
    t.fit(ds.x_train, ds.y_train, epochs=2)
    assert t.evaluate(ds.x_test, ds.y_test)["accuracy"] > 0.7  # chance: 1/3
