"""sklearn's digits, placed like MNIST, each image warped by its own random affine transform
(rotation within ±40°, scale 0.7-1.1, shear within ±0.3 rad, shift within ±3/28 of the side).

An MNIST-pretrained backbone no longer fits these as they are (its head alone reaches ~75 %),
so the recipes differ by how much of the backbone they let adapt. Same 70/30 stratified split as
`digits`; the transforms are drawn from `seed` too, so the dataset is deterministic for a seed.
"""

import numpy as np
from skimage.transform import AffineTransform, warp

from .digits import CLASS_NAMES
from .digits import load as load_digits

NATIVE = 28  # side when input_size is None: the 8x8 scans are too coarse to rotate
ROTATION_DEG, SCALE, SHEAR, SHIFT = 40.0, (0.7, 1.1), 0.3, 3 / 28


def random_affine(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Warp every NCHW image about its centre by its own random affine transform (bilinear, zero fill)."""
    n, c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(n):
        t = (AffineTransform(translation=(-w / 2, -h / 2))
             + AffineTransform(rotation=np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
                               scale=rng.uniform(*SCALE), shear=rng.uniform(-SHEAR, SHEAR))
             + AffineTransform(translation=(w / 2 + rng.uniform(-SHIFT, SHIFT) * w,
                                            h / 2 + rng.uniform(-SHIFT, SHIFT) * h)))
        for ch in range(c):
            out[i, ch] = warp(x[i, ch], t.inverse, order=1, preserve_range=True)
    return np.clip(out, 0.0, 1.0, out=out)


def load(input_size: int | None, seed: int):
    """Return x_train, y_train, x_test, y_test, class_names (white digit on black, in [0, 1])."""
    x_tr, y_tr, x_te, y_te, _ = load_digits(input_size or NATIVE, seed)
    rng = np.random.default_rng([seed, 28])
    return random_affine(x_tr, rng), y_tr, random_affine(x_te, rng), y_te, CLASS_NAMES
