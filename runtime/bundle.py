"""Reading and verifying a bundle: the manifest is the only contract between host and device."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError

FORMAT = "edgetl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("onnx", "ort-training", "executorch")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_path(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths and anything that resolves outside `root`."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise BundleError(f"bundle file name {rel!r} is not a relative path")
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise BundleError(f"bundle file {rel!r} points outside the bundle directory")
    return p


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def batch_size(self) -> int:
        return int(self.manifest["input"]["batch_size"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def trainable(self) -> list[str]:
        return [t["name"] for t in self.manifest["trainable"]]

    @property
    def state_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["optimizer"]["state"]]

    def program(self, role: str) -> Path:
        programs = self.manifest["programs"]
        if role not in programs:
            raise BundleError(f"bundle has no '{role}' program")
        return safe_path(self.root, programs[role])

    def initial_state(self) -> dict[str, np.ndarray]:
        """Initial trainable parameters and optimizer state, keyed by manifest name."""
        path = safe_path(self.root, self.manifest["state_file"])
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # numpy raises several types for corrupt archives
            raise BundleError(f"cannot read initial state '{path.name}': {e}") from None
        names = self.manifest["state_keys"]
        missing = [n for n in names.values() if n not in arrays]
        if missing:
            raise BundleError(f"initial state lacks arrays {missing[:3]}")
        return {name: arrays[key] for name, key in names.items()}


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle directory, checking format, version and every file's sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory '{root}' does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"'{root}' is not an edgetl bundle: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} is not an edgetl bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {manifest.get('format_version')!r} is not supported "
                          f"(this runtime reads version {FORMAT_VERSION}); re-export the bundle")
    for key in ("target", "input", "num_classes", "programs", "trainable", "optimizer", "state_file",
                "state_keys", "files"):
        if key not in manifest:
            raise BundleError(f"{MANIFEST} lacks '{key}'")
    if manifest["target"] not in TARGETS:
        raise BundleError(f"unknown target {manifest['target']!r}; this runtime runs {', '.join(TARGETS)}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{MANIFEST} 'files' must map names to sha256 digests")
    for rel in list(manifest["programs"].values()) + [manifest["state_file"]]:
        if rel not in files:
            raise BundleError(f"bundle file '{rel}' has no checksum in the manifest")
    for rel, digest in files.items():
        p = safe_path(root, rel)
        if not p.is_file():
            raise BundleError(f"bundle file '{rel}' is missing")
        if sha256(p) != digest:
            raise BundleError(f"bundle file '{rel}' fails its sha256 check (corrupt or altered)")
    return Bundle(root, manifest)
