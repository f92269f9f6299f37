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
from edgetl.runtime import BundleError, Trainer, load_bundle
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
    with np.load(state_file) as z:
        arrays = {k: z[k] * 0 + 7 for k in z.files}  # same names, shapes and dtypes; other values
    with open(state_file, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(BundleError, match="sha256"):
        b.initial_state()
