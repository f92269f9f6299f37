"""Fixtures shared by the device-runtime reliability tests."""
import numpy as np
import pytest


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
