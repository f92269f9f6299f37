"""Resizing and channel conversion of NCHW float32 batches (numpy + skimage only)."""

import numpy as np
from skimage.transform import resize as _sk_resize

from .errors import DatasetError

# Luminance weights used by skimage.color.rgb2gray (ITU-R BT.709).
LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
_CHUNK = 256  # images per skimage call, bounds the float64 working memory


def resize(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize NCHW images to `size` (bilinear, anti-aliased when shrinking), float32 in [0, 1]."""
    h, w = (size, size) if isinstance(size, int) else size
    n, c = x.shape[:2]
    if x.shape[2:] == (h, w):
        return x.astype(np.float32, copy=False)
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(0, n, _CHUNK):
        part = x[i:i + _CHUNK]
        k = part.shape[0]
        hwk = part.reshape(k * c, *x.shape[2:]).transpose(1, 2, 0)  # H, W, N*C
        r = _sk_resize(hwk, (h, w), order=1, anti_aliasing=True, preserve_range=True)
        out[i:i + k] = r.transpose(2, 0, 1).reshape(k, c, h, w)
    return np.clip(out, 0.0, 1.0, out=out)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert NCHW images to 1 or 3 channels: gray->RGB by repeating, RGB->gray by luminance."""
    c = x.shape[1]
    if channels == c:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if c == 3 and channels == 1:
        return np.einsum("nchw,c->nhw", x, LUMA)[:, None].astype(np.float32)
    raise DatasetError(f"cannot convert {c}-channel images to {channels} channels; use 1 or 3")
