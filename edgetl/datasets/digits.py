"""sklearn's 8x8 handwritten digits (1797 images), split 70/30 stratified by `seed`."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .transforms import resize

CLASS_NAMES = tuple(str(d) for d in range(10))


def place_like_mnist(x: np.ndarray, size: int) -> np.ndarray:
    """Scale NCHW digits to round(size*20/28) pixels and centre them in a size x size black frame."""
    inner = max(1, min(size, round(size * 20 / 28)))
    top = (size - inner) // 2
    out = np.zeros((x.shape[0], x.shape[1], size, size), dtype=np.float32)
    out[:, :, top:top + inner, top:top + inner] = resize(x, inner)
    return out


def load(input_size: int | None, seed: int):
    """Return x_train, y_train, x_test, y_test, class_names (white digit on black, in [0, 1])."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    if input_size is not None:
        x_tr, x_te = place_like_mnist(x_tr, input_size), place_like_mnist(x_te, input_size)
    return x_tr, y_tr, x_te, y_te, CLASS_NAMES
