"""Bring your own CNN: each family model (tests/families, written as torchvision/timm write them)
is prepared as users would (`input_shape` from the model), with the recipes people use, and one
lean step's gradients match torch autograd on the same prepared model. Then one recipe per family
is exported for `onnx` and stepped by the torch-free runtime, matching the torch step."""
import numpy as np
import pytest
import torch

import edgetl
from edgetl.optim import OptimizerConfig
from families import FAMILIES
from families._common import prepare_model, random_batch
from families.efficientnet import efficientnet_b0_stage_like
from helpers import lean_vs_reference

RECIPES = ["bias+mask", "side", "full", "bias+last2"]
SMOOTH = {"silu", "sigmoid", "tanh", "mish"}
TOL = 1e-4  # float32 over deep graphs; masks and ceil-mode windows make ties rare but possible


def _prepare(name: str, recipe: str):
    return prepare_model(FAMILIES, name, recipe)


_batch = random_batch


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_step_matches_autograd(name, recipe):
    pm = _prepare(name, recipe)
    gerr, perr = lean_vs_reference(pm, *_batch(pm), OptimizerConfig.make("sgd", lr=0.05))
    assert max(gerr.values()) < TOL, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < TOL, max(perr.items(), key=lambda kv: kv[1])


# The families whose graphs have SiLU / Sigmoid / Tanh (what q8 quantizes); the test checks the list.
SMOOTH_FAMILIES = ["efficientnet_b0", "hybrid", "regnet", "cspdarknet"]


@pytest.mark.parametrize("name", SMOOTH_FAMILIES)
def test_family_q8_where_smooth_activations_exist(name):
    pm = _prepare(name, "bias+mask")
    assert SMOOTH & {n.rule.kind for n in pm.graph.nodes}, f"{name} has no smooth activation"
    pm = _prepare(name, "bias+mask+q8")
    assert any(getattr(n.rule, "quant_bits", None) == 8 for n in pm.graph.nodes), "q8 changed nothing"
    gerr, _ = lean_vs_reference(pm, *_batch(pm), OptimizerConfig.make("sgd", lr=0.05))
    assert max(gerr.values()) < TOL  # against the reference with the same quantized keep


@pytest.mark.slow
def test_family_heads_and_blocks():
    """The classifier head is found in every family (a 1×1 conv for squeezenet) and lastN has blocks."""
    for name in sorted(FAMILIES):
        pm = _prepare(name, "bias+last2")
        head = pm.graph.node(pm.head)
        assert head.rule.kind == "linear" and pm.graph.output == head.name, name
        assert len(pm.notes["trainable_blocks"]) == 2, name


def _runtime_matches_torch(tmp_path, name: str, recipe: str, target: str, prepare=None) -> None:
    """Two steps of the exported program on the torch-free runtime match two torch lean steps."""
    from edgetl.exporters import export
    from edgetl.runtime import Trainer
    from edgetl.runtime.data import normalize

    pm = (prepare or _prepare)(name, recipe)
    opt = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    trainer = Trainer.load(export(pm, target, tmp_path / "b", opt, batch_size=2))
    g = np.random.default_rng(0)
    x = g.random((2, *pm.input_shape), dtype=np.float32)
    y = g.integers(0, 5, 2)
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    xt = torch.from_numpy(normalize(x, trainer.bundle.manifest))
    for _ in range(2):
        _, _, params, state, _ = step.run(xt, torch.from_numpy(y), opt.lr, params, state)
        trainer._train_step(trainer._x(x), y.astype(np.int64))
    got = trainer.backend.get_state()
    for t in pm.trainable:
        ref = params[t].numpy()
        assert np.abs(got[t] - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), t


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_exports_for_onnx_and_steps_on_the_runtime(tmp_path, name):
    _runtime_matches_torch(tmp_path, name, "bias+mask", "onnx")


# ExecuTorch lowering takes minutes on CI's cores, so two models stand for the families: the stem and two
# stages of the EfficientNet-B0-like model (smooth activations with q8 keeps, SE gates, a 5×5 residual stage;
# the whole model takes 1.5× the CPU time and passed here too), and the 1-D family. (Padded/ceil-mode
# pooling runs as one ExecuTorch program in test_rules_cnn.py, channel plumbing in test_shape_rules.py;
# every family's cells are in bench/results/families.json.)
def _tf_same_cnn() -> torch.nn.Module:
    """EfficientNet-Lite's TF-same stride-2 convs (timm's Conv2dSame: pad right/bottom, then conv), an
    even and an odd size: ExecuTorch's lowering puts the pads in the conv and shifts the input gradient."""
    from torch import nn

    from families._common import build
    from families._timm_layers import Conv2dSame

    def make():
        return nn.Sequential(Conv2dSame(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 1),
                             nn.BatchNorm2d(16), nn.ReLU6(), Conv2dSame(16, 16, 3, 2, groups=16), nn.BatchNorm2d(16),
                             nn.ReLU6(), Conv2dSame(16, 16, 5, 2, groups=16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 5))
    return build(make, (3, 24, 24))


EXECUTORCH = {"efficientnet_b0_stage": ("bias+mask+q8", efficientnet_b0_stage_like), "kws1d": ("bias+last2", None),
              "tf_same": ("bias+mask", _tf_same_cnn)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXECUTORCH))
def test_family_exports_for_executorch_and_steps_on_the_runtime(tmp_path, name):
    pytest.importorskip("executorch")
    recipe, make = EXECUTORCH[name]
    prepare = (lambda _, r: prepare_model({name: make}, name, r)) if make else None
    _runtime_matches_torch(tmp_path, name, recipe, "executorch", prepare)
