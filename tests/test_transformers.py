"""Transformers and hybrids written as timm writes them (tests/families: DeiT-like with a class
token, position embedding, fused and explicit attention and LayerScale; a MobileViT-like hybrid with
unfold / fold; a ConvNeXt-like CNN with channels-last LayerNorm, GELU and layer-scale gamma) are
prepared as users would, and one lean step's gradients match torch autograd on the same prepared
model for the recipes people use on them. Then each exports for `onnx` and is stepped by the
torch-free runtime, matching the torch step; one runs on ExecuTorch."""
import pytest

import edgetl
from edgetl.optim import OptimizerConfig
from families.transformers import TRANSFORMERS
from families._common import prepare_model, random_batch
from helpers import lean_vs_reference
from test_families import _runtime_matches_torch

RECIPES = ["bias", "bias+q8", "norm", "full", "head"]
TOL = 1e-4


def _prepare(name: str, recipe: str):
    return prepare_model(TRANSFORMERS, name, recipe)


_batch = random_batch


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformer_step_matches_autograd(name, recipe):
    pm = _prepare(name, recipe)
    gerr, perr = lean_vs_reference(pm, *_batch(pm), OptimizerConfig.make("sgd", lr=0.05))
    assert max(gerr.values()) < TOL, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < TOL, max(perr.items(), key=lambda kv: kv[1])


def _trainable_kinds(pm) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n in pm.graph.nodes:
        for role, t in n.params.items():
            if t in pm.trainable and n.name != pm.head:
                out.setdefault(n.rule.kind, set()).add(role)
    return out


def test_what_each_recipe_trains_on_a_vision_transformer():
    bias = _trainable_kinds(_prepare("deit", "bias"))
    assert bias == {"conv2d": {"bias"}, "linear": {"bias"}, "layernorm": {"bias"}}  # BitFit + norm shifts
    assert _trainable_kinds(_prepare("deit", "norm")) == {"layernorm": {"weight", "bias"}}
    full = _trainable_kinds(_prepare("deit", "full"))
    assert {"param_add", "param_concat", "param_mul"} <= set(full)  # pos embed, class token, layer scale
    assert full["linear"] == {"weight", "bias"}


def test_q8_quantizes_gelu_softmax_attention_and_norm_keeps():
    pm = _prepare("deit", "bias+q8")
    quantized = {n.rule.kind for n in pm.graph.nodes if getattr(n.rule, "quant_bits", None) == 8}
    assert quantized == {"gelu", "softmax", "attention", "layernorm"}
    exact = _prepare("deit", "bias")
    kept = pm.memory(8).kept_activations_bytes, exact.memory(8).kept_activations_bytes
    assert kept[0] < 0.7 * kept[1], kept  # q, k, v stay fp32 (what the q @ kᵀ gradient needs)


def test_norm_refuses_a_model_without_norm_layers():
    from edgetl.errors import RecipeError
    from families import FAMILIES

    model = FAMILIES["resnet18"]()
    with pytest.raises(RecipeError, match="norm"):
        edgetl.prepare(model, "norm", num_classes=5, input_shape=model.input_shape)


ONNX = {"deit": "bias+q8", "deit_mean": "full", "mobilevit": "norm", "convnext": "bias+q8"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ONNX))
def test_transformer_exports_for_onnx_and_steps_on_the_runtime(tmp_path, name):
    _runtime_matches_torch(tmp_path, name, ONNX[name], "onnx", _prepare)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["full", "lora", "bias+q8"])
def test_window_transformer_with_attention_bias_tables_steps_on_the_runtime(tmp_path, recipe):
    """Swin's relative position bias table and LeViT's attention biases train under full (gather
    forward, scatter-add backward in the exported program) and stay frozen otherwise."""
    _runtime_matches_torch(tmp_path, "swin", recipe, "onnx", _prepare)


def test_full_trains_the_attention_bias_tables_and_bias_leaves_them_frozen():
    tables = {"block1.attn.relative_position_bias_table", "block2.attn.attention_biases"}
    assert tables <= set(_prepare("swin", "full").trainable)
    assert _trainable_kinds(_prepare("swin", "full"))["param_table_add"] == {"param"}
    for recipe in ("bias", "norm", "lora"):
        assert not tables & set(_prepare("swin", recipe).trainable), recipe


# One ExecuTorch export stands for the transformers (each takes about a minute of CI's CPU): the window
# transformer, whose attention bias tables train under full (gather forward, scatter-add backward), with q8
# keeps (LayerNorm, softmax, GELU). DeiT `bias+q8` passed here too; test_side_transformers exports
# DeiT `side` for executorch.
@pytest.mark.slow
def test_attention_bias_tables_and_q8_keeps_export_for_executorch_and_step_on_the_runtime(tmp_path):
    pytest.importorskip("executorch")
    _runtime_matches_torch(tmp_path, "swin", "full+q8", "executorch", _prepare)
