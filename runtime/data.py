"""Checking what a user hands to fit/evaluate/predict, before anything touches the model."""
from __future__ import annotations

import numpy as np

from .errors import InputError


def check_images(x, shape: tuple[int, ...], what: str = "x") -> np.ndarray:
    """float samples in [0, 1] of the bundle's shape, (C, H, W) images or (C, L) signals;
    returned as contiguous float32."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise InputError(f"{what} must hold floating-point images in [0, 1], got dtype {x.dtype}")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{what} must have shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if len(x) == 0:
        raise InputError(f"{what} is empty")
    if not np.isfinite(x).all():
        raise InputError(f"{what} contains NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"{what} must be scaled to [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_labels(y, n: int, num_classes: int, what: str = "y") -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(y).__name__}")
    if y.dtype.kind not in "iu":
        raise InputError(f"{what} must hold integer class ids, got dtype {y.dtype}")
    if y.ndim != 1:
        raise InputError(f"{what} must be 1-D, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise InputError(f"x and {what} have different lengths ({n} vs {len(y)})")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{what} has class ids outside [0, {num_classes - 1}] "
                         f"(min {int(y.min())}, max {int(y.max())})")
    return np.ascontiguousarray(y, dtype=np.int64)


def normalize(x: np.ndarray, manifest: dict) -> np.ndarray:
    pre = manifest["input"]["preprocess"]
    c = x.shape[1]
    per_channel = (1, c, *[1] * (x.ndim - 2))
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(per_channel)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(per_channel)
    out = np.subtract(x, mean)  # one new array, divided in place: no second batch-sized temporary
    np.divide(out, std, out=out)
    return out


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """A dataset file as written by `edgetl data`: x_train, y_train, x_test, y_test (no pickles).
    Its declared sizes are checked before anything is inflated: at most `max_bytes` in all
    (default: $EDGETL_MAX_DATA_BYTES, else half of the physical memory)."""
    import zipfile
    from pathlib import Path

    from .npz import NpzError, inspect

    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file '{path}' {'is not a file' if path.exists() else 'does not exist'}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"data file '{path}' is not an .npz archive")
    try:
        members = inspect(path, max_bytes)
    except NpzError as e:
        raise InputError(f"data file '{path}' {e}") from None
    pickled = [k for k in NPZ_KEYS if k in members and members[k].dtype.hasobject]
    if pickled:
        raise InputError(f"data file '{path}' holds pickled objects ('{pickled[0]}'), which are refused")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise InputError(f"data file '{path}' lacks {', '.join(missing)}")
            return {k: z[k] for k in NPZ_KEYS}
    except InputError:
        raise
    except Exception as e:  # zip and npy parsers raise many types on corrupt input
        if isinstance(e, ValueError) and "pickle" in str(e):
            raise InputError(f"data file '{path}' holds pickled objects, which are refused") from None
        raise InputError(f"data file '{path}' is corrupt ({type(e).__name__})") from None
