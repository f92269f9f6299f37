"""Gradient parity of the lean step against torch autograd on the same (dequantized) model,
for every recipe on the real backbones."""
import pytest
import torch

import edgetl
from edgetl.optim import OptimizerConfig
from helpers import lean_vs_reference

RECIPES = ["full", "head", "bias", "bias+mask", "side", "side+mask", "bias+last1", "full+last2", "side+bias+mask"]
MODELS = [("mnist_cnn", 28), ("efficientnet_lite0", 64), ("mobilenet_v3_small", 64)]
TOL = 1e-5


def _batch(pm, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, pm.in_channels, pm.input_size, pm.input_size, generator=g)
    return x, torch.randint(0, pm.num_classes, (n,), generator=g)


@pytest.mark.parametrize("model,size", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("recipe", RECIPES)
def test_one_step_matches_autograd(model, size, recipe):
    pm = edgetl.prepare(model, recipe, num_classes=5, input_size=size)
    gerr, perr = lean_vs_reference(pm, *_batch(pm), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < TOL, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < TOL, max(perr.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("model,size", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_several_steps_with_optimizer_state(model, size, opt):
    pm = edgetl.prepare(model, "bias+mask", num_classes=3, input_size=size)
    # AdamW divides by sqrt(v) + eps: with eps 1e-8 a gradient element at rounding level (~1e-9)
    # gets a full lr-sized step whose sign is rounding noise, so both sides use eps 1e-6.
    extra = {"eps": 1e-6} if opt == "adamw" else {}
    cfg = OptimizerConfig.make(opt, lr=0.01 if opt == "sgd" else 1e-3, weight_decay=0.01, **extra)
    gerr, perr = lean_vs_reference(pm, *_batch(pm, seed=1), cfg, steps=3, scale="tensor")
    # After the first step the two sides start from parameters that differ by float rounding;
    # an activation at a ReLU6 boundary can then flip one mask bit and move one bias element, so
    # several steps are compared at the tensor's scale with 1e-4 (the cross-runtime bound).
    assert max(perr.values()) < 1e-4, max(perr.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_update_matches_torch(opt):
    from helpers import rel_err

    torch.manual_seed(0)
    cfg = OptimizerConfig.make(opt, lr=0.01, weight_decay=0.1)
    params = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    leaves = [v.clone().requires_grad_(True) for v in params.values()]
    ref = cfg.torch_optimizer(leaves)
    state = cfg.init_state(params)
    for _ in range(4):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        for leaf, g in zip(leaves, grads.values()):
            leaf.grad = g.clone()
        ref.step()
        params, state = cfg.update(params, grads, state, torch.tensor(cfg.lr))
    for leaf, v in zip(leaves, params.values()):
        assert rel_err(v, leaf) < 1e-6


def test_frozen_weights_are_int8_and_stay_int8():
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10)
    step = pm.step_module()
    convs = [n for n in pm.graph.nodes if n.rule.kind == "conv2d"]
    for n in convs:
        assert pm.graph.is_quantized(n.params["weight"])
    int8 = [b for b in step.buffers() if b.dtype == torch.int8]
    assert len(int8) == len(convs) + 1  # three convs and fc_layers.0; the new head trains in fp32
    assert not any(b.dtype == torch.float32 and b.numel() > 1000 for b in step.buffers())


def test_fp32_frozen_option():
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10, frozen_dtype="fp32")
    assert not any(b.dtype == torch.int8 for b in pm.step_module().buffers())


def test_hardswish_mask_is_an_approximation():
    """With `mask`, Hard-Swish's backward differs from exact autograd (it is MobileTL's rule)."""
    from edgetl.reference import reference_steps

    pm = edgetl.prepare("mobilenet_v3_small", "bias+mask", num_classes=3, input_size=64)
    x, y = _batch(pm)
    approx = reference_steps(pm, x, y, OptimizerConfig())
    for n in pm.graph.nodes:
        if n.rule.kind == "hardswish":
            n.rule = n.rule.replace(mask=False)
    exact = reference_steps(pm, x, y, OptimizerConfig())
    diff = max(float((approx.grads[t] - exact.grads[t]).abs().max()) for t in pm.trainable)
    assert diff > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("recipe", ["bias+mask", "side", "full"])
def test_cuda_step_matches_autograd(recipe):
    pm = edgetl.prepare("efficientnet_lite0", recipe, num_classes=5, input_size=64)
    gerr, perr = lean_vs_reference(pm, *_batch(pm), OptimizerConfig.make("sgd", lr=0.1), device="cuda")
    assert max(gerr.values()) < 1e-4 and max(perr.values()) < 1e-4
