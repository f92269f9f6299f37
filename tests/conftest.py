"""Test-run setup for parallel workers, and fixtures shared by the device-runtime reliability tests."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # CI runs one pytest-xdist worker per core (`-n 2` in pyproject.toml): a worker's torch, OpenMP and
    # BLAS then take one thread each instead of one per core (set before numpy or torch is imported;
    # subprocesses the tests start inherit it).
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group marks
def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadgroup`): the tests of a module with a module-scoped fixture run on one
    worker (so its bundles are exported once), and long units are queued first, single tests last (so
    no worker is left with a long unit at the end while the other idles). Plain runs keep file order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    group_of = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for fd in (defs.name2fixturedefs.values() if defs else ()) for d in fd}
        if item.get_closest_marker("xdist_group"):
            mark = item.get_closest_marker("xdist_group")
            group_of[item] = mark.kwargs.get("name", mark.args[0] if mark.args else "default")
        elif scopes & {"module", "class", "package"}:
            group_of[item] = item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group_of[item]))
    slow_groups = {group_of[i] for i in items if i in group_of and i.get_closest_marker("slow")}
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None or group_of.get(item) in slow_groups
    # slow units first, module groups before single tests; file order otherwise (and within a group)
    items[:] = sorted(items, key=lambda i: (not slow(i), i not in group_of))


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
