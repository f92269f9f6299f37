"""Texture patches cut from skimage's 512x512 gray photos of brick, grass and gravel.

Training patches come only from the top half of each photo (rows 0-255) and test patches only
from the bottom half (rows 256-511), so no pixel is shared between train and test. Patches lie on
a grid with stride 32; the native patch side is 64 (3 x 105 = 315 train and 315 test images).

Sizing: for input_size < 64 the 64-pixel patches are downsampled (anti-aliased). For
64 < input_size <= 256 patches of side input_size are cut directly, so no upsampling happens
(they then cover a larger area of the photo, and there are fewer of them). Above 256, which is
the half height, 256-pixel patches are cut and upsampled.
"""

import numpy as np
import skimage.data

from .transforms import resize

CLASS_NAMES = ("brick", "grass", "gravel")
NATIVE, STRIDE, HALF = 64, 32, 256


def patch_origins(side: int, height: int = HALF, width: int = 512) -> list[tuple[int, int]]:
    """Top-left corners of the stride-32 grid of side x side patches inside a height x width area."""
    return [(r, c) for r in range(0, height - side + 1, STRIDE) for c in range(0, width - side + 1, STRIDE)]


def _cut(img: np.ndarray, side: int, row0: int) -> np.ndarray:
    return np.stack([img[row0 + r:row0 + r + side, c:c + side] for r, c in patch_origins(side)])


def load(input_size: int | None, seed: int):
    """Return x_train, y_train, x_test, y_test, class_names; `seed` only shuffles the order."""
    side = NATIVE if input_size is None else min(max(input_size, NATIVE), HALF)
    parts: dict[str, list] = {"train": [], "test": []}
    for label, name in enumerate(CLASS_NAMES):
        img = getattr(skimage.data, name)().astype(np.float32) / 255.0
        for split, row0 in (("train", 0), ("test", HALF)):
            p = _cut(img, side, row0)
            parts[split].append((p, np.full(len(p), label, dtype=np.int64)))
    rng = np.random.default_rng(seed)
    out = []
    for split in ("train", "test"):
        x = np.concatenate([p for p, _ in parts[split]])[:, None]
        y = np.concatenate([l for _, l in parts[split]])
        if input_size is not None and side != input_size:
            x = resize(x, input_size)
        order = rng.permutation(len(y))
        out += [np.ascontiguousarray(x[order]), y[order]]
    return (*out, CLASS_NAMES)
