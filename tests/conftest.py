"""Test-run setup for parallel workers, and fixtures shared by the device-runtime reliability tests."""
import os
from collections import Counter

if os.environ.get("PYTEST_XDIST_WORKER"):
    # CI runs one pytest-xdist worker per core (`-n 2` in pyproject.toml): a worker's torch, OpenMP and
    # BLAS then take one thread each instead of one per core, which halves their CPU time when both
    # workers compute (set before numpy or torch is imported; subprocesses of tests inherit it).
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadfile`: a file's tests, and so its module fixtures, stay on one worker)
    the files are queued longest first, so that no worker is left with a long file at the end while the
    other idles: files with a slow test, then by number of tests. Plain runs keep the file order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    file_of = {item: item.nodeid.split("::")[0] for item in items}
    count = Counter(file_of.values())
    slow = {file_of[item] for item in items if item.get_closest_marker("slow")}
    items[:] = sorted(items, key=lambda i: (file_of[i] not in slow, -count[file_of[i]], file_of[i]))


@pytest.fixture(scope="module")
def digits():
    """160 real digits at 28×28, one channel: 10 steps per epoch at batch 16."""
    from edgetl.datasets import load_dataset

    ds = load_dataset("digits", input_size=28, channels=1)
    return ds.x_train[:160], ds.y_train[:160]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, digits):
    """The same digits as a data file for the device CLI (32 of them as the test split)."""
    x, y = digits
    path = tmp_path_factory.mktemp("data") / "digits160.npz"
    with open(path, "wb") as f:  # exactly this path (np.savez would append .npz to a bare name)
        np.savez(f, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    return path
