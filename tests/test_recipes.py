"""Recipes: parsing, and which tensors each part makes trainable."""
import pytest

import edgetl
from edgetl.errors import RecipeError
from edgetl.recipes import parse_recipe


@pytest.mark.parametrize("text,msg", [
    ("", "empty"), ("bias+", "empty"), ("dora", "unknown recipe part 'dora'"), ("mask", "only modifiers"),
    ("bias+bias", "twice"), ("side+last2", "combine it with"), ("full+bias", "drop 'bias'"),
    ("bias+last1+last2", "more than one"), ("bias+last0", "at least 1"),
    ("lora+full", "drop 'lora'"), ("lora+lora8", "more than one lora"), ("lora0", "at least 1"),
    ("bias+lora+last2", "does not limit 'lora'"),
])
def test_bad_recipes(text, msg):
    with pytest.raises(RecipeError, match=msg):
        parse_recipe(text)


def test_parts_and_modifiers():
    r = parse_recipe("mask+bias+last2")
    assert [p.name for p in r.ordered()] == ["bias", "mask", "last2"]
    assert r.has("mask") and r.text == "mask+bias+last2"


def test_trainable_sets_on_mnist_cnn():
    def trainable(recipe):
        return set(edgetl.prepare("mnist_cnn", recipe, num_classes=10).trainable)

    head = {"head.weight", "head.bias"}
    assert trainable("head") == head
    biases = {"conv_layers.0.bias", "conv_layers.3.bias", "conv_layers.6.bias", "fc_layers.0.bias"}
    assert trainable("bias") == head | biases
    assert trainable("bias+last1") == head | {"fc_layers.0.bias"}
    assert trainable("bias+last2") == head | {"fc_layers.0.bias", "conv_layers.6.bias"}
    assert trainable("bias+mask") == trainable("bias")
    full = trainable("full")
    assert {"conv_layers.0.weight", "fc_layers.0.weight"} <= full and len(full) == 10


@pytest.mark.parametrize("model,size", [("mnist_cnn", 28), ("efficientnet_lite0", 224)])
def test_side_network_is_small_and_backbone_gets_no_gradient(model, size):
    pm = edgetl.prepare(model, "side", num_classes=10, input_size=size)
    side = [t for t in pm.trainable if t.startswith("side.")]
    side_params = sum(pm.graph.tensors[t].numel() for t in side)
    backbone = sum(v.numel() for k, v in pm.graph.tensors.items() if not k.startswith(("side.", "head.")))
    assert 0.01 <= side_params / backbone <= 0.05
    assert set(pm.trainable) == set(side) | {"head.weight", "head.bias"}
    req = pm.graph.requires_grad()
    assert not any(req[n.name] for n in pm.graph.nodes if not n.module.startswith(("side.", "head")))
    assert len(pm.notes["side"]["taps"]) >= 3


def test_mask_sets_every_activation():
    pm = edgetl.prepare("mobilenet_v3_small", "bias+mask", num_classes=4, input_size=64)
    acts = [n for n in pm.graph.nodes if n.rule.kind in ("relu", "relu6", "hardswish", "hardsigmoid")]
    assert acts and all(n.rule.mask for n in acts)
    assert any(n.rule.approximate for n in acts)  # Hard-Swish's sign rule
