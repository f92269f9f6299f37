"""Load and validate a user .npz with x_train, y_train, x_test, y_test (and optional class_names).

Files are opened with allow_pickle=False: pickled object arrays are refused, never unpickled.
x: NCHW (or NHW, given one channel) with 1 or 3 channels; uint8/integer pixels in 0..255 are
divided by 255, float pixels must already lie in [0, 1]. y: 1-D integer labels >= 0.
"""

import zipfile
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .transforms import resize

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(path: Path) -> dict[str, np.ndarray]:
    """Read every array of the archive without unpickling anything, after checking what its zip
    directory and .npy headers declare (nothing is inflated past what they allow)."""
    from edgetl.runtime.npz import NpzError, inspect

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":
            raise DatasetError(f"{path.name}: holds a single .npy array; expected an .npz archive with {', '.join(KEYS)}")
        if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's protocol header
            raise DatasetError(f"{path.name}: not an .npz archive but a Python pickle, which is refused")
        raise DatasetError(f"{path.name}: not an .npz (zip) archive")
    try:
        members = inspect(path)
    except NpzError as e:
        raise DatasetError(f"{path.name}: {e}") from None
    missing = [k for k in KEYS if k not in members]
    if missing:
        raise DatasetError(f"{path.name}: missing keys {', '.join(missing)} (expected {', '.join(KEYS)})")
    for k in (*KEYS, "class_names"):
        if k in members and members[k].dtype.hasobject:
            raise DatasetError(f"{path.name}: '{k}' is a pickled object array; refusing to unpickle it")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path.name}: unreadable .npz archive ({_one_line(e)})") from None
    with z:
        out = {}
        for k in (*KEYS, "class_names"):
            if k not in z.files:
                continue
            try:
                out[k] = z[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise DatasetError(f"{path.name}: '{k}' cannot be read ({_one_line(e)})") from None
    return out


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _images(name: str, x: np.ndarray, where: str) -> np.ndarray:
    """Check one x array and return it as float32 NCHW in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DatasetError(f"{where}: {name} has shape {x.shape}; expected 4-D NCHW or 3-D NHW")
    if x.shape[1] not in (1, 3):
        raise DatasetError(f"{where}: {name} has {x.shape[1]} channels in axis 1 (shape {x.shape}); expected NCHW with 1 or 3 channels")
    if len(x) == 0:
        raise DatasetError(f"{where}: {name} is empty")
    if x.dtype.kind in "iu":
        if x.min() < 0 or x.max() > 255:
            raise DatasetError(f"{where}: {name} integer pixels span {x.min()}..{x.max()}; expected 0..255")
        return (x / 255.0).astype(np.float32)
    if x.dtype.kind != "f":
        raise DatasetError(f"{where}: {name} has dtype {x.dtype}; expected float or integer pixels")
    if not np.isfinite(x).all():
        raise DatasetError(f"{where}: {name} contains non-finite values (NaN or inf)")
    if x.min() < 0 or x.max() > 1:
        raise DatasetError(f"{where}: {name} float pixels span {x.min():g}..{x.max():g}; expected [0, 1]")
    return x.astype(np.float32)


def _labels(name: str, y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DatasetError(f"{where}: {name} has shape {y.shape} and dtype {y.dtype}; expected 1-D integer labels")
    if len(y) != n:
        raise DatasetError(f"{where}: {name} has {len(y)} labels but x has {n} images")
    if y.min() < 0:
        raise DatasetError(f"{where}: {name} has negative labels")
    return y.astype(np.int64)


def load(path: str | Path, input_size: int | None):
    """Return x_train, y_train, x_test, y_test, class_names from a validated user .npz."""
    path = Path(path)
    a = _read(path)
    where = path.name
    x_tr, x_te = _images("x_train", a["x_train"], where), _images("x_test", a["x_test"], where)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(f"{where}: x_train images are {x_tr.shape[1:]} but x_test images are {x_te.shape[1:]}")
    y_tr = _labels("y_train", a["y_train"], len(x_tr), where)
    y_te = _labels("y_test", a["y_test"], len(x_te), where)
    top = int(max(y_tr.max(), y_te.max())) + 1
    if "class_names" in a:
        names = a["class_names"]
        if names.ndim != 1 or names.dtype.kind != "U":
            raise DatasetError(f"{where}: class_names has shape {names.shape} and dtype {names.dtype}; expected a 1-D unicode array")
        if len(names) < top:
            raise DatasetError(f"{where}: labels go up to {top - 1} but class_names has only {len(names)} entries")
        class_names = tuple(str(s) for s in names)
    else:
        class_names = tuple(str(i) for i in range(top))
    if input_size is not None:
        x_tr, x_te = resize(x_tr, input_size), resize(x_te, input_size)
    return x_tr, y_tr, x_te, y_te, class_names
