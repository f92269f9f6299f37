"""Tests of edgetl.datasets: built-ins, transforms, few_shot, and user .npz validation."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from edgetl.datasets import (Dataset, DatasetError, available_datasets, few_shot, load_dataset, save_npz)
from edgetl.datasets.textures import HALF, patch_origins
from edgetl.datasets.transforms import LUMA, to_channels

EXPECTED = {  # name: (train, test, native side, classes)
    "digits": (1257, 540, 8, 10),
    "digits-affine": (1257, 540, 28, 10),
    "textures": (315, 315, 64, 3),
    "faces": (140, 60, 25, 2),
}
REPO = Path(__file__).resolve().parents[1]


def test_available():
    assert available_datasets() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_shapes_dtypes_ranges_balance(name):
    n_tr, n_te, side, k = EXPECTED[name]
    ds = load_dataset(name)
    assert isinstance(ds, Dataset) and ds.name == name and ds.num_classes == k
    assert ds.x_train.shape == (n_tr, 1, side, side) and ds.x_test.shape == (n_te, 1, side, side)
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1 and x.max() > 0.5
    for y, n in ((ds.y_train, n_tr), (ds.y_test, n_te)):
        assert y.dtype == np.int64 and y.shape == (n,)
        counts = np.bincount(y, minlength=k)
        assert len(counts) == k and counts.min() >= 0.95 * counts.max() - 1  # balanced / stratified
    assert len(ds.class_names) == k and name in repr(ds)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deterministic_for_seed(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = load_dataset(name, seed=4)
    assert not np.array_equal(a.y_train, c.y_train)


def test_faces_labels():
    ds = load_dataset("faces")
    assert ds.class_names == ("non-face", "face")
    assert np.bincount(ds.y_train).tolist() == [70, 70] and np.bincount(ds.y_test).tolist() == [30, 30]


def _raw_patches(side: int, row0: int) -> set[bytes]:
    out = set()
    for name in ("brick", "grass", "gravel"):
        img = getattr(skimage.data, name)().astype(np.float32) / 255.0
        out |= {img[row0 + r:row0 + r + side, c:c + side].tobytes() for r, c in patch_origins(side)}
    return out


@pytest.mark.parametrize("size", [None, 128])
def test_textures_train_top_test_bottom(size):
    side = size or 64
    assert all(r + side <= HALF for r, _ in patch_origins(side))
    top, bottom = _raw_patches(side, 0), _raw_patches(side, HALF)
    assert not top & bottom
    ds = load_dataset("textures", input_size=size)
    assert ds.x_train.shape[2:] == (side, side)  # cut directly, never upsampled
    assert {p[0].tobytes() for p in ds.x_train} <= top
    assert {p[0].tobytes() for p in ds.x_test} <= bottom


def test_textures_small_and_huge_sizes():
    assert load_dataset("textures", input_size=32).x_train.shape == (315, 1, 32, 32)
    assert load_dataset("textures", input_size=300).x_test.shape == (27, 1, 300, 300)


def test_digits_placed_like_mnist():
    ds = load_dataset("digits", input_size=28, channels=3)
    x = ds.x_train
    assert x.shape == (1257, 3, 28, 28) and x.dtype == np.float32
    assert x[:, :, :4].max() == 0 and x[:, :, 24:].max() == 0  # 20x20 digit, 4-pixel black border
    assert x[:, :, :, :4].max() == 0 and x[:, :, :, 24:].max() == 0
    assert x[:, :, 4:24, 4:24].max() == 1.0
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
    assert x.mean() < 0.5  # white digit on black


def test_digits_affine_warps_each_digit_differently():
    """Same split and labels as `digits`; every image is its MNIST-placed digit under its own affine warp."""
    from edgetl.datasets.digits import place_like_mnist

    plain, warped = load_dataset("digits", seed=2), load_dataset("digits-affine", seed=2)
    np.testing.assert_array_equal(plain.y_train, warped.y_train)
    np.testing.assert_array_equal(plain.y_test, warped.y_test)
    base, x = place_like_mnist(plain.x_test, 28), warped.x_test
    diff = np.abs(x - base).reshape(len(x), -1).max(1)
    assert diff.min() > 0.1  # no image left as it was
    ink = x.reshape(len(x), -1).sum(1) / base.reshape(len(x), -1).sum(1)
    assert 0.35 < ink.min() and ink.max() < 1.6  # the digit stays inside the frame, scaled by 0.7-1.1
    # each image has its own transform: warped images are less alike than the plain ones
    assert np.corrcoef(x[:50].reshape(50, -1)).mean() < np.corrcoef(base[:50].reshape(50, -1)).mean()
    assert load_dataset("digits-affine", input_size=16).x_train.shape[2:] == (16, 16)


def test_resize_and_channels():
    ds = load_dataset("faces", input_size=32, channels=3)
    assert ds.x_train.shape == (140, 3, 32, 32) and ds.x_test.shape == (60, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    rgb = np.random.default_rng(0).random((4, 3, 5, 5), dtype=np.float32)
    gray = to_channels(rgb, 1)
    assert gray.shape == (4, 1, 5, 5) and gray.dtype == np.float32
    np.testing.assert_allclose(gray[:, 0], np.einsum("nchw,c->nhw", rgb, LUMA), rtol=1e-6)
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("faces", channels=2)
    with pytest.raises(DatasetError, match="input_size"):
        load_dataset("faces", input_size=0)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="digits, digits-affine, faces, textures") as e:
        load_dataset("mnist")
    assert isinstance(e.value, DatasetError)


def test_few_shot():
    ds = load_dataset("digits")
    fs = few_shot(ds, 5, seed=1)
    assert np.bincount(fs.y_train).tolist() == [5] * 10 and fs.x_train.shape == (50, 1, 8, 8)
    assert fs.x_test is ds.x_test and fs.y_test is ds.y_test and fs.class_names == ds.class_names
    train_rows = {r.tobytes() for r in ds.x_train}
    assert all(r.tobytes() in train_rows for r in fs.x_train)
    np.testing.assert_array_equal(fs.x_train, few_shot(ds, 5, seed=1).x_train)
    assert not np.array_equal(fs.x_train, few_shot(ds, 5, seed=2).x_train)
    with pytest.raises(DatasetError, match="fewer than per_class"):
        few_shot(load_dataset("faces"), 71)
    with pytest.raises(DatasetError, match="per_class"):
        few_shot(ds, 0)


def test_npz_round_trip(tmp_path):
    ds = load_dataset("faces", channels=3)
    path = tmp_path / "mine.npz"
    save_npz(ds, path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert z["class_names"].dtype.kind == "U"
    back = load_dataset(str(path))
    assert back.name == "mine" and back.class_names == ds.class_names
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, f), getattr(ds, f))
    assert load_dataset(str(path), input_size=16, channels=1).x_test.shape == (60, 1, 16, 16)


def _arrays(**over):
    rng = np.random.default_rng(0)
    a = dict(x_train=rng.random((6, 1, 4, 4)).astype(np.float32), y_train=np.array([0, 1, 2, 0, 1, 2]),
             x_test=rng.random((3, 1, 4, 4)).astype(np.float32), y_test=np.array([0, 1, 2]))
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def test_npz_nhw_uint8_and_default_names(tmp_path):
    path = tmp_path / "u8.npz"
    np.savez(path, **_arrays(x_train=np.full((6, 4, 4), 255, np.uint8), x_test=np.zeros((3, 4, 4), np.uint8)))
    ds = load_dataset(str(path))
    assert ds.x_train.shape == (6, 1, 4, 4) and ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0
    assert ds.class_names == ("0", "1", "2")


BAD = {
    "missing keys y_test": dict(y_test=None),
    "has shape (6, 16); expected 4-D": dict(x_train=np.zeros((6, 16), np.float32)),
    "5 channels": dict(x_train=np.zeros((6, 5, 4, 4), np.float32)),
    "expected 1-D integer labels": dict(y_train=np.zeros(6, np.float32)),
    "y_test has shape (3, 1)": dict(y_test=np.zeros((3, 1), np.int64)),
    "y_train has 5 labels but x has 6": dict(y_train=np.zeros(5, np.int64)),
    "non-finite": dict(x_test=np.full((3, 1, 4, 4), np.nan, np.float32)),
    "expected [0, 1]": dict(x_train=np.full((6, 1, 4, 4), 7.0, np.float32)),
    "x_test images are": dict(x_test=np.zeros((3, 1, 5, 5), np.float32)),
    "negative labels": dict(y_test=np.array([0, -1, 2])),
    "class_names has only 2": dict(class_names=np.array(["a", "b"])),
    "x_train is empty": dict(x_train=np.zeros((0, 1, 4, 4), np.float32), y_train=np.zeros(0, np.int64)),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_npz(tmp_path, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **_arrays(**BAD[problem]))
    with pytest.raises(DatasetError) as e:
        load_dataset(str(path))
    msg = str(e.value)
    assert problem in msg and "\n" not in msg


def test_not_an_npz(tmp_path):
    txt = tmp_path / "notes.npz"
    txt.write_text("hello")
    with pytest.raises(DatasetError, match="not an .npz"):
        load_dataset(str(txt))
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DatasetError, match="single .npy array"):
        load_dataset(str(npy))


class _Evil:
    """Unpickling this object creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_npz_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, **_arrays(y_train=np.array([_Evil(marker)] * 6, dtype=object)))
    with pytest.raises(DatasetError, match="'y_train' is a pickled object array"):
        load_dataset(str(path))
    assert not marker.exists()
    raw = tmp_path / "raw.npz"  # a bare pickle under an .npz name
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(DatasetError, match="not an .npz"):
        load_dataset(str(raw))
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as z:  # the payload is real: unpickling would run it
        z["y_train"]
    assert marker.exists()


def test_no_torch_import():
    code = "import sys, edgetl.datasets; assert not {'torch', 'torchvision'} & set(sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
