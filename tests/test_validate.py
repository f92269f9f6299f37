"""`edgetl validate`: the bundle's step run in torch (CUDA, or CPU) agrees with the runtime."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import edgetl
from edgetl.exporters import export
from edgetl.validate import validate

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def mnist_bundle(tmp_path_factory):
    from edgetl.datasets import load_dataset, save_npz

    root = tmp_path_factory.mktemp("validate")
    data = root / "digits.npz"
    ds = load_dataset("digits", input_size=28, channels=1)
    # a slice keeps the eager CPU epoch short: 10 steps of 32
    save_npz(replace(ds, x_train=ds.x_train[:320], y_train=ds.y_train[:320], x_test=ds.x_test[:270],
                     y_test=ds.y_test[:270]), data)
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    bundle = export(pm, "onnx", root / "bundle", edgetl.OptimizerConfig.make("sgd", lr=0.02), batch_size=32)
    return bundle, data


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl", "validate", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cpu_parity_and_training(mnist_bundle):
    bundle, data = mnist_bundle
    r = validate(bundle, data, device="cpu", epochs=1, steps=3)
    assert r["device"] == "cpu" and r["note"] is None
    assert r["init_matches_prepare"] and r["init_max_abs_diff"] == 0.0
    p = r["parity"]
    assert p["steps"] == 3 and len(p["per_step_rel_err"]) == 3
    assert p["ok"] and r["ok"] and p["max_rel_err"] < 1e-4 == p["tolerance"]
    assert p["loss_max_abs_diff"] < 1e-4
    assert p["runtime"].startswith("onnx target")
    assert len(r["epoch_s"]) == 1 and r["epoch_s"][0] > 0 and r["steps_per_epoch"] == 10
    assert r["test_accuracy"] > 0.5  # chance: 0.1


def test_cli_tolerance_too_tight_exits_1(mnist_bundle):
    bundle, data = mnist_bundle
    args = ["--device", "cuda"] if not HAS_CUDA else ["--device", "cpu"]  # without CUDA: also the fallback
    r = _cli(bundle, "--data", data, *args, "--epochs", "0", "--steps", "1", "--tolerance", "1e-12", "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["parity"]["max_rel_err"] > 1e-12
    if not HAS_CUDA:  # asked for CUDA without one: a line on stderr, a JSON field, and a CPU run
        assert "CUDA is not available" in r.stderr
        assert out["device"] == "cpu" and out["device_requested"] == "cuda" and out["cuda_available"] is False
        assert "CUDA is not available" in out["note"]


def test_initial_state_from_another_seed_is_reported_and_the_bundles_is_used(mnist_bundle):
    bundle, data = mnist_bundle
    r = validate(bundle, data, device="cpu", epochs=0, steps=2, init_seed=3)
    assert r["init_seed"] == 3 and not r["init_matches_prepare"]  # prepare(seed=3) draws another head...
    assert r["ok"]  # ...but both sides train from the bundle's own initial state
    assert r["epoch_s"] == [] and r["test_accuracy"] < 0.5  # no training: the random head


def test_bad_arguments_are_clear_errors(mnist_bundle, tmp_path):
    from edgetl.errors import EdgeTLError
    from edgetl.runtime import BundleError

    bundle, data = mnist_bundle
    with pytest.raises(EdgeTLError, match="--device must be"):
        validate(bundle, data, device="tpu")
    with pytest.raises(EdgeTLError, match="--steps must be"):
        validate(bundle, data, device="cpu", steps=0)
    with pytest.raises(BundleError, match="does not exist"):
        validate(tmp_path / "nope", data, device="cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_parity(mnist_bundle):
    bundle, data = mnist_bundle
    r = validate(bundle, data, device="cuda", epochs=3, steps=5)
    assert r["device"].startswith("cuda") and r["note"] is None
    assert r["ok"], r["parity"]
    assert r["test_accuracy"] > 0.5
