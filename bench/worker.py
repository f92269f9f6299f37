"""One benchmark row in its own process: the torch eager baselines and ExecuTorch's own
joint-graph training flow. (edgetl's programs and ONNX Runtime's artifacts are measured by
`python -m edgetl.runtime profile`, torch-free.)

    python bench/worker.py torch-full MODEL SIZE BATCH STEPS
    python bench/worker.py torch-autograd MODEL SIZE BATCH STEPS RECIPE
    python bench/worker.py et-joint MODEL SIZE BATCH STEPS RECIPE
    python bench/worker.py torch-peft MODEL SIZE BATCH STEPS RANK

bench/run.py runs each row twice, for memory with MALLOC_MMAP_THRESHOLD_=65536 and for step time
with the default allocator, and keeps each figure from its own run. $EDGETL_THREADS sets torch's
threads (bench/run.py: 1, as for onnxruntime).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgetl.runtime import profile
from edgetl.runtime.backends.base import Resident, above_libraries, threads_from_env

NUM_CLASSES = 10
LIBRARIES = None  # resident memory once torch (and the row's libraries) are imported, set in main()
ROOT = Path(__file__).resolve().parent.parent
# Bring-your-own-model rows: the model as users write it (tests/families), not a registered backbone
FAMILY_MODELS = {"resnet18-like": "resnet18", "efficientnet_b0-like": "efficientnet_b0", "deit_tiny-like": "deit_tiny"}
# peft's LoRA on the layers edgetl's `lora` adapts in a ViT: every Linear of the blocks (the 16×16
# patch conv and the head excluded; the head trains in full, as with edgetl)
PEFT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
PEFT_ALPHA = 8.0  # peft's default lora_alpha, as edgetl's lora


def family_model(model: str) -> nn.Module | None:
    """A fresh eval-mode instance of the tests/families model behind `model`, or None."""
    if model not in FAMILY_MODELS:
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from families import FAMILIES
    from families.deit import deit_tiny_like

    return (FAMILIES | {"deit_tiny": deit_tiny_like})[FAMILY_MODELS[model]](num_classes=NUM_CLASSES)


def prepare(model: str, recipe: str, size: int, **kw):
    """edgetl.prepare for a registered backbone or a family model, at a square `size` input."""
    import edgetl

    m = family_model(model)
    if m is None:
        return edgetl.prepare(model, recipe, num_classes=NUM_CLASSES, input_size=size, **kw)
    return edgetl.prepare(m, recipe, num_classes=NUM_CLASSES, input_shape=(m.input_shape[0], size, size), **kw)


def measure_steps(step, steps: int) -> dict:
    """Peak RSS above the pre-step level, step times (wall and the process's CPU time) and the
    process's peak over its whole life, measured as the device profiler does (the caller keeps the
    memory of the run with the memory setting and the times of the other run)."""
    m = profile.measure_steps(step, steps)
    whole, after = max(m.load_hwm, m.hwm), Resident.now()
    out = {"measured_peak_bytes": m.above, "process_peak_bytes": m.hwm, "load_peak_bytes": m.load_hwm,
           "whole_peak_bytes": whole, "whole_above_libraries_bytes": above_libraries(whole, LIBRARIES, after),
           "libraries_paged_in_bytes": max(after.libraries - LIBRARIES.libraries, 0),
           "allocator": profile.allocator(), "threads": threads_from_env(), "versions": profile.versions()}
    for key, ts in (("step_ms", m.wall_ms), ("step_cpu_ms", m.cpu_ms)):
        ts = sorted(ts)
        out |= {f"{key}_median": ts[len(ts) // 2], f"{key}_min": ts[0], f"{key}_max": ts[-1]}
    return out


def _batch(c, size, batch):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, c, size, size, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def torch_full(model: str, size: int, batch: int, steps: int) -> dict:
    """Full fine-tuning as a user would write it: the pretrained model in train mode, a new head."""
    from edgetl.backbones import load_backbone

    net = family_model(model)
    if net is not None:  # its own classifier already has NUM_CLASSES outputs
        net, channels = net.train(), net.input_shape[0]
    else:
        bb = load_backbone(model)
        net, channels = bb.model.train(), bb.in_channels
        parent, _, leaf = bb.head.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        old = getattr(owner, leaf)
        setattr(owner, leaf, nn.Linear(old.in_features, NUM_CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = _batch(channels, size, batch)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    step()  # optimizer state and allocator warm-up, as a real loop has after its first step
    return measure_steps(step, steps)


def torch_autograd(model: str, size: int, batch: int, steps: int, recipe: str) -> dict:
    """The same prepared model (BN folded, dequantized frozen weights) and trainable set, trained
    by autograd: what `requires_grad=False` alone gives."""
    from edgetl.interpret import computing, interpret, weights_from

    pm = prepare(model, recipe, size)
    frozen = {t: pm.frozen(t) for t in pm.stored}
    params = {t: v.requires_grad_(True) for t, v in pm.initial_params().items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9)
    x, y = _batch(pm.in_channels, size, batch)

    def forward():
        return interpret(pm.graph, x, computing(weights_from(params, frozen.__getitem__)))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(), y).backward()
        opt.step()

    step()
    return measure_steps(step, steps)


def torch_peft(model: str, size: int, batch: int, steps: int, rank: str) -> dict:
    """HF peft's LoRA, as a user would write it: get_peft_model on the model in train mode, frozen
    fp32 weights, LoRA (rank `rank`, alpha 8) on the blocks' Linears and the head trained."""
    # transformers (which peft imports) loads torchvision where installed, and the CPU-torch host's
    # torchvision is broken: mark it missing
    sys.modules.setdefault("torchvision", None)
    from peft import LoraConfig, get_peft_model

    net = family_model(model)
    if net is None:
        raise SystemExit(f"torch-peft: no ViT model '{model}'")
    channels = net.input_shape[0]
    net = get_peft_model(net, LoraConfig(r=int(rank), lora_alpha=PEFT_ALPHA, lora_dropout=0.0,
                                         target_modules=PEFT_TARGETS, modules_to_save=["head"])).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x, y = _batch(channels, size, batch)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    out = measure_steps(step, steps)
    out["trainable_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return out


def et_joint(model: str, size: int, batch: int, steps: int, recipe: str) -> dict:
    """ExecuTorch's own training flow: the joint forward-backward program, SGD outside it."""
    import tempfile

    from edgetl.exporters.executorch import export_executorch_joint
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    pm = prepare(model, recipe, size)
    with tempfile.TemporaryDirectory() as d:
        res = export_executorch_joint(pm, batch, Path(d))
        buf = (Path(d) / res["programs"]["joint_step"]).read_bytes()
    size_bytes = len(buf)
    mod = _load_for_executorch_for_training_from_buffer(buf)
    x, y = _batch(pm.in_channels, size, batch)
    mod.forward_backward("forward", (x, y))
    opt = get_sgd_optimizer(mod.named_parameters(), 0.01, 0.9, 0, 0, False)

    def step():
        mod.forward_backward("forward", (x, y))
        opt.step(mod.named_gradients())

    step()
    out = measure_steps(step, steps)
    out["planned_bytes"] = res["extra"]["executorch_joint"]["planned_bytes"]
    out["measured_peak_bytes"] += out["planned_bytes"]  # its arena is allocated at load, before the steps
    out["bundle_bytes"] = size_bytes
    return out


def _library_setup() -> None:
    """What torch sets up lazily on its first optimizer and convolution step (the optimizer's first use
    imports torch._dynamo: ~70 MB), done on a toy model: library memory, not the model's."""
    conv = nn.Conv2d(1, 2, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.zeros(1, 1, 4, 4)).sum().backward()
    opt.step()


def main() -> None:
    global LIBRARIES
    kind, model, size, batch, steps, *rest = sys.argv[1:]
    if threads_from_env() is not None:
        torch.set_num_threads(threads_from_env())
    # the row's libraries loaded before the baseline (whole_above_libraries_bytes), as torch is
    import edgetl.backbones, edgetl.interpret  # noqa: F401, E401
    if kind == "et-joint":
        import executorch.extension.training  # noqa: F401
    if kind == "torch-peft":
        sys.modules.setdefault("torchvision", None)  # as in torch_peft
        import peft  # noqa: F401
    _library_setup()
    LIBRARIES = Resident.now()
    args = (model, int(size), int(batch), int(steps), *rest)
    fn = {"torch-full": torch_full, "torch-autograd": torch_autograd, "et-joint": et_joint,
          "torch-peft": torch_peft}[kind]
    print(json.dumps(fn(*args)))


if __name__ == "__main__":
    main()
