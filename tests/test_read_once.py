"""A bundle's files are read once and checked: what a runtime parses or hands to ONNX Runtime is
exactly what matched the manifest's sha256, even when a file in the bundle is swapped after load."""
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime import BundleError, Trainer, load_bundle, safetensors
from edgetl.runtime.backends import make_backend

B = 16


@pytest.fixture(scope="module")
def prepared():
    return edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)


@pytest.fixture(scope="module")
def onnx_bundle(prepared, tmp_path_factory):
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05)
    return export(prepared, "onnx", tmp_path_factory.mktemp("read_once") / "bundle", opt, batch_size=B)


@pytest.fixture(scope="module")
def ort_bundle(prepared, tmp_path_factory):
    opt = edgetl.OptimizerConfig.make("adamw", lr=0.01)
    return export(prepared, "ort-training", tmp_path_factory.mktemp("read_once_ort") / "bundle", opt, batch_size=B)


@pytest.fixture(scope="module")
def digits():
    from edgetl.datasets import load_dataset

    ds = load_dataset("digits", input_size=28, channels=1)
    return ds.x_train[:32], ds.y_train[:32]


def _copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_initial_state_swapped_after_load_is_refused(onnx_bundle, tmp_path):
    root = _copy(onnx_bundle, tmp_path)
    b = load_bundle(root)
    state_file = root / b.manifest["state_file"]
    arrays, meta = safetensors.decode(state_file.read_bytes())
    # same names, shapes and dtypes; other values
    state_file.write_bytes(safetensors.encode({k: v * 0 + 7 for k, v in arrays.items()}, meta))
    with pytest.raises(BundleError, match="sha256"):
        b.initial_state()


def test_ort_training_never_opens_the_bundles_files(ort_bundle, digits, tmp_path):
    root = _copy(ort_bundle, tmp_path)
    b = load_bundle(root)
    backend = make_backend(b)
    # Where the training bindings are not installed here, the backend runs in the peer Python: its
    # private copy lives in that child process, so only the behaviour below can be checked.
    in_process = not getattr(backend, "out_of_process", False)
    if in_process:
        private = Path(backend.scratch)
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
        assert not private.resolve().is_relative_to(root.resolve())
    # Swap every file ORT could open: a reopen (resume, divergence rollback) must not read them.
    for rel in b.manifest["files"]:
        (root / rel).write_bytes(b"not what was checked")
    backend.set_state(backend.get_state())  # reopens ORT's session with the optimizer state
    t = Trainer(b, backend)
    t.fit(*digits, epochs=1)
    assert np.isfinite(t.evaluate(*digits)["loss"])
    if in_process:
        backend.close()
        assert not private.exists()


def test_ort_training_checkpoint_swapped_before_the_runtime_opens_it(ort_bundle, tmp_path):
    root = _copy(ort_bundle, tmp_path)
    b = load_bundle(root)
    (root / "checkpoint").write_bytes((root / "checkpoint").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="sha256"):
        make_backend(b)
