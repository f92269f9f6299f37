"""What a bundle needs so that the device can merge trained LoRA updates into the weights
(`export-inference`): an `inference` program in which every LoRA layer is the original layer
reading its weight W' = W + scale·B·A as an input (so the inference model has the original
architecture and costs nothing extra), and `lora.safetensors`, the frozen W of those layers as
stored (int8 + per-channel scale, or fp32). The runtime computes W' with numpy (runtime/lora_merge.py)
and bakes it into the inference model as an initializer. The manifest's `lora` entry names it all."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from edgetl.recipes.lora import lora_layers
from edgetl.rules.conv import Conv2d
from edgetl.rules.linear import Linear
from edgetl.rules.lora import LORA_ROLES, LoraLinear
from edgetl.runtime import lora_merge, safetensors

LORA_FILE = lora_merge.FILE


def _plain(rule):
    """The LoRA rule's layer without its branch (bound to the same shapes)."""
    cls = Linear if isinstance(rule, LoraLinear) else Conv2d
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in rule.__dict__.items() if k not in ("rank", "scale")})
    return new


def merged_model(prepared):
    """A copy of `prepared` whose LoRA layers are plain layers reading their (merged) weight from
    a trainable input `merged.<i>`, one per layer (after the original trainable tensors, LoRA's A
    and B left out), or None without LoRA."""
    layers = {n.name: f"merged.{i}" for i, n in enumerate(lora_layers(prepared.graph))}
    if not layers:
        return None
    g = prepared.graph
    tensors = dict(g.tensors)
    nodes = []
    for n in g.nodes:
        if n.name in layers:
            tensors[layers[n.name]] = g.tensors[n.params["weight"]]
            params = {k: v for k, v in n.params.items() if k not in LORA_ROLES} | {"weight": layers[n.name]}
            n = dataclasses.replace(n, rule=_plain(n.rule), params=params)
        nodes.append(n)
    used = {t for n in nodes for t in n.params.values()}
    graph = dataclasses.replace(g, nodes=nodes, tensors={k: v for k, v in tensors.items() if k in used},
                                trainable=[t for t in g.trainable if t in used] + list(layers.values()))
    stored = {k: v for k, v in prepared.stored.items() if k in used}
    return dataclasses.replace(prepared, graph=graph, stored=stored)


def write_lora_file(prepared, out: Path, program: str) -> dict:
    """Write lora.safetensors into the bundle directory `out`; return the manifest's `lora` entry."""
    arrays, layers = {}, []
    for i, n in enumerate(lora_layers(prepared.graph)):
        stored = prepared.stored[n.params["weight"]]
        keys = [f"w{i}", f"s{i}"][: len(stored)]
        for k, t in zip(keys, stored):
            arrays[k] = t.detach().cpu().numpy()
        layers.append({"input": f"merged.{i}", "a": n.params["lora_a"], "b": n.params["lora_b"], "weight": keys[0],
                       **({"weight_scale": keys[1]} if len(keys) == 2 else {}),
                       "shape": list(stored[0].shape), "scale": n.rule.scale})
    (out / LORA_FILE).write_bytes(safetensors.encode(arrays, lora_merge.METADATA))
    return {"file": LORA_FILE, "program": program, "layers": layers}


__all__ = ["LORA_FILE", "merged_model", "write_lora_file"]
