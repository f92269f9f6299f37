"""skimage's LFW subset: 200 gray 25x25 crops, the first 100 faces, the last 100 non-faces.

Classes are ("non-face", "face"), so label 1 means face. Stratified 140 train / 60 test split by `seed`.
"""

import numpy as np
from skimage.data import lfw_subset
from sklearn.model_selection import train_test_split

from .transforms import resize

CLASS_NAMES = ("non-face", "face")


def load(input_size: int | None, seed: int):
    """Return x_train, y_train, x_test, y_test, class_names."""
    imgs = np.asarray(lfw_subset(), dtype=np.float32)
    if imgs.max() > 1.0:  # the docstring says uint8; the shipped file is float in [0, 1]
        imgs /= 255.0
    x = imgs[:, None]
    y = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=60, stratify=y, random_state=seed)
    if input_size is not None:
        x_tr, x_te = resize(x_tr, input_size), resize(x_te, input_size)
    return x_tr, y_tr, x_te, y_te, CLASS_NAMES
