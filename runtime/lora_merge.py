"""Merging trained LoRA updates into the frozen weights for the inference model, with numpy:
W' = W + scale·B·A for every layer the manifest's `lora` entry lists (W read from the bundle's
lora file as stored: int8 with a per-output-channel scale, or fp32). The file is safetensors
(BUNDLE.md); bundles exported before it hold an npz, still read (never unpickled)."""
from __future__ import annotations

import io
import math

import numpy as np

from . import safetensors
from .errors import BundleError
from .npz import NpzError, inspect
from .targets import CONTRACT

FILE: str = CONTRACT["lora"]["file"]
METADATA = {"format": CONTRACT["lora"]["format"], "version": str(CONTRACT["lora"]["version"])}


def _stored(data: bytes, spec: dict) -> dict[str, np.ndarray]:
    """The lora file's arrays by name: safetensors, or the npz of older bundles."""
    if data[:2] != b"PK":
        return safetensors.decode(data)[0]
    buf = io.BytesIO(data)
    # judged by its declared sizes before anything is inflated: at most the listed weights (fp32 bound)
    limit = sum(4 * math.prod(layer["shape"]) + 4 * layer["shape"][0] for layer in spec["layers"])
    inspect(buf, max_bytes=limit + 4096 * (2 * len(spec["layers"]) + 1))
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def merged_weights(bundle, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{inference program input: W'} from the trained parameters `params` (by manifest name)."""
    spec = bundle.manifest["lora"]
    try:
        stored = _stored(bundle.file_bytes(spec["file"]), spec)
        out = {}
        for layer in spec["layers"]:
            w = stored[layer["weight"]].astype(np.float32)
            if "weight_scale" in layer:
                scale = stored[layer["weight_scale"]].astype(np.float32)
                w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            a, b = params[layer["a"]], params[layer["b"]]
            delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            if w.shape != tuple(layer["shape"]) or delta.size != w.size:
                raise BundleError(f"the lora layer '{layer['input']}' does not match its weight's shape")
            out[layer["input"]] = (w + np.float32(layer["scale"]) * delta.reshape(w.shape)).astype(np.float32)
        return out
    except (NpzError, safetensors.SafetensorsError) as e:
        raise BundleError(f"cannot read the bundle's lora file: it {e}") from None
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise BundleError(f"cannot merge the LoRA updates: the bundle's lora entry is malformed ({e})") from None
