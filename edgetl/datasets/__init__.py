"""Small real image datasets for transfer learning, as float32 NCHW numpy arrays (no torch).

Built-ins ship inside installed packages, so nothing is downloaded:
  digits    sklearn 8x8 digits, 10 classes, 1257 train / 540 test
  digits-affine  the same digits at 28x28 (MNIST-like), each warped by its own random affine transform
  textures  skimage brick/grass/gravel 64x64 patches, train from top halves, test from bottom halves, 315 / 315
  faces     skimage LFW subset 25x25, classes ("non-face", "face"), 140 train / 60 test
Any other spec is read as a path to a user .npz (see `npz`).
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import digits, digits_affine, faces, npz, textures
from .errors import DatasetError
from .transforms import to_channels

__all__ = ["Dataset", "DatasetError", "available_datasets", "few_shot", "load_dataset", "save_npz"]

_BUILTINS = {"digits": digits.load, "digits-affine": digits_affine.load, "faces": faces.load,
             "textures": textures.load}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test images (float32 NCHW in [0, 1]) with int64 labels indexing class_names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"classes={self.num_classes})")


def available_datasets() -> list[str]:
    """Names of the built-in datasets."""
    return sorted(_BUILTINS)


def load_dataset(spec: str, input_size: int | None = None, channels: int | None = None, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name, or a user .npz by path, optionally resized and channel-converted."""
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise DatasetError(f"input_size must be a positive int or None, got {input_size!r}")
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1, 3 or None, got {channels!r}")
    spec = str(spec)
    if spec in _BUILTINS:
        name, parts = spec, _BUILTINS[spec](input_size, seed)
    elif Path(spec).is_file():
        name, parts = Path(spec).stem, npz.load(spec, input_size)
    else:
        raise DatasetError(f"unknown dataset {spec!r}: not a file; available datasets: {', '.join(available_datasets())}")
    x_tr, y_tr, x_te, y_te, class_names = parts
    if channels is not None:
        x_tr, x_te = to_channels(x_tr, channels), to_channels(x_te, channels)
    return Dataset(name, x_tr, y_tr, x_te, y_te, tuple(class_names))


def few_shot(ds: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """Keep `per_class` training examples of every class (chosen by `seed`, original order); test set unchanged."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise DatasetError(f"per_class must be a positive int, got {per_class!r}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.y_train == c)
        if len(idx) < per_class:
            raise DatasetError(f"class {ds.class_names[c]!r} has {len(idx)} training examples, fewer than per_class={per_class}")
        keep.append(rng.choice(idx, per_class, replace=False))
    keep = np.sort(np.concatenate(keep))
    return replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])


def save_npz(ds: Dataset, path: str | Path) -> None:
    """Write the dataset with np.savez (plain arrays, class_names as unicode; no pickles)."""
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             class_names=np.array(ds.class_names, dtype=np.str_))
