"""The family test models (tests/families) are what the bring-your-own-CNN front end is tested
against, so they must stay what they claim to be: eval-mode models with warmed-up BatchNorm that
run eagerly, pass `torch.export` (non-strict), and after `run_decompositions()` contain the core
ATen ops that make their family hard (padded/ceil-mode max pooling, SiLU/Sigmoid gates, channel
split and slice, 1×1-conv classifiers, 1-D pooling lowered to 2-D, ...)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from families import FAMILIES

# Ops each family must show after run_decompositions (beyond convolution): what its front end must handle.
DISTINCTIVE_OPS: dict[str, set[str]] = {
    "resnet18": {"max_pool2d_with_indices", "add", "relu", "mean", "addmm"},
    "resnext": {"max_pool2d_with_indices", "add", "relu", "mean", "addmm"},
    "efficientnet_b0": {"sigmoid", "mul", "add", "mean", "addmm"},
    "mobilenet_v3": {"clamp", "div", "mul", "relu", "mean", "addmm"},
    "shufflenet_v2": {"split_with_sizes", "cat", "permute", "view", "max_pool2d_with_indices", "mean", "addmm"},
    "squeezenet": {"cat", "max_pool2d_with_indices", "relu", "mean"},
    "densenet": {"cat", "avg_pool2d", "max_pool2d_with_indices", "_native_batch_norm_legit_no_training", "mean"},
    "googlenet": {"cat", "max_pool2d_with_indices", "relu", "mean", "addmm"},
    "ghostnet": {"cat", "slice", "clamp", "div", "mul", "relu", "mean", "addmm"},
    "lcnet": {"clamp", "div", "mul", "relu", "mean", "addmm"},
    "hybrid": {"constant_pad_nd", "avg_pool2d", "sigmoid", "mul", "add", "mean", "addmm"},
    "regnet": {"sigmoid", "mul", "add", "relu", "mean", "addmm"},
    "mnasnet": {"add", "relu", "mean", "addmm"},
    "kws1d": {"unsqueeze", "squeeze", "max_pool2d_with_indices", "add", "relu", "mean", "addmm"},
    "nonsquare": {"max_pool2d_with_indices", "relu", "mean", "addmm"},
    # three branches summed, the identity branch a BatchNorm of the block input (an affine)
    "repvgg": {"add", "relu", "_native_batch_norm_legit_no_training", "mean", "addmm"},
    "vovnet": {"cat", "max_pool2d_with_indices", "relu", "hardtanh", "mean", "mul", "add", "addmm"},
    "res2net": {"split_with_sizes", "cat", "avg_pool2d", "add", "max_pool2d_with_indices", "mean", "addmm"},
    # Mish is decomposed by run_decompositions (edgetl keeps it whole); the neck's LeakyReLU is not
    "cspdarknet": {"split_with_sizes", "cat", "add", "tanh", "log1p", "leaky_relu", "mean", "addmm"},
    "hrnet": {"upsample_nearest2d", "upsample_bilinear2d", "cat", "add", "relu", "mean", "addmm"},
}
NO_BATCHNORM = {"squeezenet"}


def op_kind(node: torch.fx.Node) -> str:
    """'aten.max_pool2d_with_indices.default' → 'max_pool2d_with_indices'."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


@functools.cache
def exported(name: str):
    """(model, example input, eager output, decomposed ExportedProgram), built once per family."""
    model = FAMILIES[name]()
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    ep = torch.export.export(model, (x,), strict=False).run_decompositions()
    return model, x, y, ep


def calls(ep, kind: str) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function" and op_kind(n) == kind]


def test_every_family_has_its_expected_ops():
    assert set(DISTINCTIVE_OPS) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_runs_and_exports(name):
    model, x, y, ep = exported(name)
    assert not model.training and isinstance(model.input_shape, tuple)
    assert y.shape[0] == 2 and y.ndim == 2 and torch.isfinite(y).all() and y.std() > 0
    # the exported program computes what the eager model computes
    torch.testing.assert_close(ep.module()(x), y, rtol=1e-4, atol=1e-5)
    kinds = {op_kind(n) for n in ep.graph.nodes if n.op == "call_function"}
    print(f"{name}: {sorted(kinds)}")
    assert "convolution" in kinds
    assert DISTINCTIVE_OPS[name] <= kinds, f"missing {sorted(DISTINCTIVE_OPS[name] - kinds)}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_deterministic_with_warm_batchnorm(name):
    a, b = FAMILIES[name](), FAMILIES[name]()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    bns = [m for m in a.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bool(bns) == (name not in NO_BATCHNORM)
    for bn in bns:
        assert bn.running_mean.abs().max() > 1e-3 and (bn.running_var - 1).abs().max() > 1e-3
        assert (bn.weight - 1).abs().max() > 1e-3 and bn.bias.abs().max() > 1e-3


def _maxpool_params(ep) -> list[tuple]:
    """(kernel, stride, padding, ceil_mode) of every max pool, defaults filled in."""
    out = []
    for n in calls(ep, "max_pool2d_with_indices"):
        k, s = tuple(n.args[1]), tuple(n.args[2]) or tuple(n.args[1])
        p = tuple(n.args[3]) if len(n.args) > 3 else (0, 0)
        ceil = bool(n.args[5]) if len(n.args) > 5 else False
        out.append((k, s, p, ceil))
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnext", "shufflenet_v2", "densenet"])
def test_stem_max_pool_is_3x3_stride2_pad1(name):
    assert ((3, 3), (2, 2), (1, 1), False) in _maxpool_params(exported(name)[3])


@pytest.mark.parametrize("name, pools", [
    ("googlenet", {((3, 3), (2, 2), (0, 0), True), ((3, 3), (1, 1), (1, 1), True), ((2, 2), (2, 2), (0, 0), True)}),
    ("squeezenet", {((3, 3), (2, 2), (0, 0), True)}),
])
def test_ceil_mode_max_pools(name, pools):
    assert pools <= set(_maxpool_params(exported(name)[3]))


@pytest.mark.parametrize("name", ["resnext", "regnet", "shufflenet_v2", "efficientnet_b0"])
def test_grouped_convolutions(name):
    groups = {n.args[-1] for n in calls(exported(name)[3], "convolution")}
    assert max(groups) > 1


def test_densenet_has_batchnorm_not_after_a_conv():
    """BN-ReLU-Conv order: norms read a concat or a pool, so they cannot fold into a conv."""
    ep = exported("densenet")[3]
    producers = {op_kind(n.args[0]) for n in calls(ep, "_native_batch_norm_legit_no_training")}
    assert producers & {"cat", "avg_pool2d", "max_pool2d_with_indices"}


def test_ghostnet_slices_channels():
    ep = exported("ghostnet")[3]
    sliced = [n for n in calls(ep, "slice") if n.args[1] == 1 and n.args[3] < n.args[0].meta["val"].shape[1]]
    assert sliced, "no channel slice x[:, :c] that drops channels"


def test_squeezenet_classifier_is_a_1x1_conv():
    model, _, _, ep = exported("squeezenet")
    assert not calls(ep, "addmm") and not any(isinstance(m, nn.Linear) for m in model.modules())
    last_conv = calls(ep, "convolution")[-1]
    assert last_conv.args[1].meta["val"].shape[:2] == (10, 32) and last_conv.args[1].meta["val"].shape[2:] == (1, 1)


def test_hybrid_defeats_fx_symbolic_trace_but_exports():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(FAMILIES["hybrid"]())
    pads = calls(exported("hybrid")[3], "constant_pad_nd")
    assert [0, 1, 0, 1] in [list(n.args[1]) for n in pads]  # the odd-width branch, specialised at export


def test_timm_layers_are_subclasses_with_their_own_forward():
    from families._timm_layers import BatchNormAct2d, Linear

    lc = FAMILIES["lcnet"]()
    assert any(type(m) is BatchNormAct2d for m in lc.modules())
    assert type(lc.classifier) is Linear and isinstance(lc.classifier, nn.Linear)


@pytest.mark.parametrize("name, shape", [("kws1d", (40, 98)), ("nonsquare", (1, 24, 40)), ("hybrid", (3, 40, 40))])
def test_non_default_input_shapes(name, shape):
    assert FAMILIES[name]().input_shape == shape
