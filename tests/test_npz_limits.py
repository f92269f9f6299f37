""".npz archives are judged by what they declare before anything is inflated (issue 14, item 8):
a small archive that would inflate far past the allowed size, or whose .npy header declares more
data than its member holds (numpy allocates what the header says first), is refused from the zip
directory and the headers alone, by the device data loader, the bundle's state loader and
`edgetl data`; and the host's messages blame pickles only where there are pickles."""
import io
import json
import shutil
import tracemalloc
import zipfile

import numpy as np
import pytest

import edgetl
from edgetl.cli import main as host_main
from edgetl.datasets import DatasetError
from edgetl.datasets.npz import load as load_user_npz
from edgetl.exporters import export
from edgetl.runtime import BundleError, InputError, load_bundle
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256
from edgetl.runtime.data import load_npz
from edgetl.runtime.npz import LIMIT_ENV
from state_files import as_npz_state

MB = 1 << 20


def _npy_header(dtype: str, shape: tuple) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue()


def _bomb(path, members: dict[str, tuple[str, tuple]], real: dict[str, np.ndarray] = {}) -> None:
    """An .npz whose members are headers declaring (dtype, shape) followed by that many zero
    bytes, deflated (a ~1000:1 ratio), plus ordinary arrays."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (dtype, shape) in members.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                f.write(_npy_header(dtype, shape))
                left = int(np.prod(shape)) * np.dtype(dtype).itemsize
                chunk = bytes(min(left, 8 * MB))
                while left > 0:
                    f.write(chunk[: min(left, len(chunk))])
                    left -= len(chunk)
        for name, a in real.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, a)


def _liar(path, members: dict[str, tuple[str, tuple]], real: dict[str, np.ndarray] = {}) -> None:
    """An .npz whose members' headers declare (dtype, shape) but that hold only 8 bytes of data."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (dtype, shape) in members.items():
            z.writestr(f"{name}.npy", _npy_header(dtype, shape) + bytes(8))
        for name, a in real.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, a)


def _peak_mb(call) -> tuple[float, Exception | None]:
    """Peak traced memory (numpy and zipfile allocations included) while `call()` runs."""
    tracemalloc.start()
    try:
        call()
        err = None
    except Exception as e:  # noqa: BLE001 - returned for the test to judge
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return peak, err


LABELS = {"y_train": np.zeros(16, np.int64), "y_test": np.zeros(16, np.int64)}


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """0.1 MB on disk, 120 MB inflated (the issue's was 1.2 MB and 1.25 GB)."""
    p = tmp_path_factory.mktemp("npz") / "bomb.npz"
    n = 120_000_000 // (28 * 28 * 4)
    _bomb(p, {"x_train": ("<f4", (n, 1, 28, 28)), "x_test": ("<f4", (16, 1, 28, 28))}, LABELS)
    assert p.stat().st_size < 2 * MB
    return p


def test_a_zip_bomb_is_refused_before_it_inflates(bomb, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, str(32 * MB))
    peak, err = _peak_mb(lambda: load_npz(bomb))
    assert isinstance(err, InputError) and "would inflate to 120.0 MB" in str(err) and LIMIT_ENV in str(err), err
    assert peak < 20, f"{peak:.0f} MB allocated before refusing"
    peak, err = _peak_mb(lambda: load_npz(bomb, max_bytes=100_000_000))
    assert isinstance(err, InputError) and peak < 20
    monkeypatch.setenv(LIMIT_ENV, str(200 * MB))  # allowed: it loads
    assert load_npz(bomb)["x_train"].nbytes == 120_000_000 // (28 * 28 * 4) * 28 * 28 * 4


def test_the_default_limit_is_half_the_memory_or_the_environment(monkeypatch):
    import os

    from edgetl.runtime.npz import NpzError, default_limit

    monkeypatch.delenv(LIMIT_ENV, raising=False)
    assert default_limit() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    monkeypatch.setenv(LIMIT_ENV, "12345")
    assert default_limit() == 12345
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(NpzError, match=LIMIT_ENV):
        default_limit()


@pytest.mark.parametrize("shape", [(10**12,), (10**6, 1, 1000, 1000), (2**40, 2**40)])
def test_a_header_that_declares_more_than_its_member_holds(tmp_path, shape):
    p = tmp_path / "liar.npz"
    _liar(p, {"x_train": ("<f4", shape)}, {"x_test": np.zeros((16, 1, 28, 28), np.float32), **LABELS})
    peak, err = _peak_mb(lambda: load_npz(p))
    assert isinstance(err, InputError) and "declares shape" in str(err) and "corrupt" in str(err), err
    assert peak < 20
    with pytest.raises(DatasetError, match="declares shape") as info:
        load_user_npz(p, None)
    assert "pickle" not in str(info.value)


def test_edgetl_data_on_a_huge_header_is_one_line(tmp_path, capsys):
    """Was: a MemoryError traceback."""
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10)
    b = export(pm, "onnx", tmp_path / "b", edgetl.OptimizerConfig.make("sgd", lr=0.05), batch_size=16)
    p = tmp_path / "liar.npz"
    _liar(p, {"x_train": ("<f4", (10**6, 1, 1000, 1000))}, {"x_test": np.zeros((16, 1, 28, 28), np.float32),
                                                           **LABELS})
    rc = host_main(["data", str(p), "--bundle", str(b), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "declares shape" in err, err
    # and the bundle's state: a member that would inflate past what the manifest's tensors need
    d = tmp_path / "b2"
    shutil.copytree(b, d)
    as_npz_state(d)  # a bundle of an earlier edgetl: its state is an npz
    with np.load(d / "state.npz") as z:
        arrays = {k: z[k] for k in z.files}
    _bomb(d / "state.npz", {"junk": ("<f4", (16 * MB,))}, arrays)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["state.npz"] = sha256(d / "state.npz")
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    bundle = load_bundle(d)
    peak, err = _peak_mb(bundle.initial_state)
    assert isinstance(err, BundleError) and "would inflate" in str(err), err
    assert peak < 20
    _liar(d / "state.npz", {"a0": ("<f4", (32, 10**9))}, {k: v for k, v in arrays.items() if k != "a0"})
    m["files"]["state.npz"] = sha256(d / "state.npz")
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"'a0' that declares shape \(32, 1000000000\)"):
        load_bundle(d).initial_state()


# ---- host messages: pickles only where there are pickles -------------------------------------
def test_host_npz_messages_blame_pickles_only_for_pickles(tmp_path):
    import pickle

    x = np.zeros((4, 1, 8, 8), np.float32)
    y = np.zeros(4, np.int64)
    cases = {}
    cases["text"] = tmp_path / "text.npz"
    cases["text"].write_text("hello")
    cases["bad header"] = tmp_path / "header.npz"
    with zipfile.ZipFile(cases["bad header"], "w") as z:
        z.writestr("x_train.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}\n")
        for k in ("y_train", "x_test", "y_test"):
            with z.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, y if k.startswith("y") else x)
    cases["truncated data"] = tmp_path / "trunc.npz"
    _liar(cases["truncated data"], {"x_train": ("<f4", (4, 1, 8, 8))}, {"x_test": x, "y_train": y, "y_test": y})
    for name, p in cases.items():
        with pytest.raises(DatasetError) as info:
            load_user_npz(p, None)
        assert "pickle" not in str(info.value).lower(), (name, str(info.value))
    real = {"a pickle": tmp_path / "p.npz", "an object array": tmp_path / "o.npz"}
    real["a pickle"].write_bytes(pickle.dumps({"x_train": x}))
    np.savez(real["an object array"], x_train=x, y_train=y.astype(object), x_test=x, y_test=y)
    for name, p in real.items():
        with pytest.raises(DatasetError, match="pickle"):
            load_user_npz(p, None)
