"""Splitting a training set over simulated clients: IID, or label-skewed by a Dirichlet prior."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeTLError

MAX_TRIES = 1000  # Dirichlet draws tried before giving up on every client getting `min_size` samples


def parse_partition(text: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    if text == "iid":
        return "iid", None
    name, _, alpha = text.partition(":")
    if name == "dirichlet":
        try:
            a = float(alpha)
        except ValueError:
            a = -1.0
        if a > 0 and np.isfinite(a):
            return "dirichlet", a
    raise EdgeTLError(f"--partition must be iid or dirichlet:ALPHA with ALPHA > 0, got '{text}'")


def partition(y: np.ndarray, clients: int, scheme: str, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Indices of each client's samples; every client gets at least `min_size` (e.g. one batch)."""
    name, alpha = parse_partition(scheme)
    n = len(y)
    if clients < 1:
        raise EdgeTLError(f"--clients must be ≥ 1, got {clients}")
    if n < clients * min_size:
        raise EdgeTLError(f"{n} training samples cannot give {clients} clients {min_size} each (one batch)")
    rng = np.random.default_rng(seed)
    if name == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    classes = np.unique(y)
    for _ in range(MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise EdgeTLError(f"dirichlet:{alpha} over {clients} clients left a client with fewer than {min_size} samples "
                      f"in {MAX_TRIES} draws; use fewer clients or a larger ALPHA")


def write_shards(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], folder: str | Path) -> Path:
    """One data file per client, `client-<i>.npz`, as a device would hold it (no test split)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        with open(folder / f"client-{i}.npz", "wb") as f:
            np.savez(f, x_train=x[idx], y_train=y[idx], x_test=x[:0], y_test=y[:0])
    return folder
