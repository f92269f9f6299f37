"""LoRA (`lora`, `loraN`): the Linear and 1×1-conv LoRA rules against a peft-style torch model
under autograd (frozen W, trainable A and B); what the recipe trains and keeps; the exported
`onnx` (and one `executorch`) step fitting torch-free like the torch step; and export-inference
merging the updates into the weights of a model with the original architecture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import edgetl
from edgetl.errors import RecipeError
from edgetl.lowering import Lowering
from edgetl.optim import OptimizerConfig
from edgetl.quant import dequantize_per_channel, quantize_per_channel
from edgetl.rules.conv import Conv2d
from edgetl.rules.linear import Linear
from edgetl.rules.lora import LoraConv2d, LoraLinear
from families import FAMILIES
from helpers import lean_vs_reference, rel_err
from rule_harness import bind, lean_grads

ALL = frozenset({"weight", "bias", "lora_a", "lora_b"}) - {"weight"}


class PeftLinear(nn.Module):
    """HF peft's LoRA Linear, written out: frozen base layer, lora_A, lora_B, scaling = alpha / r."""

    def __init__(self, weight, bias, a, b, scaling):
        super().__init__()
        self.base = nn.Linear(weight.shape[1], weight.shape[0])
        self.base.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.base.bias = nn.Parameter(bias.clone())
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False)
        self.lora_A.weight, self.lora_B.weight = nn.Parameter(a.clone()), nn.Parameter(b.clone())
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


class PeftConv1x1(nn.Module):
    """peft's LoRA Conv2d for a 1×1 conv: lora_A a conv with the base's stride, lora_B a 1×1 conv."""

    def __init__(self, weight, bias, a, b, scaling, stride):
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.clone())
        self.a, self.b, self.scaling, self.stride = nn.Parameter(a.clone()), nn.Parameter(b.clone()), scaling, stride

    def forward(self, x):
        base = F.conv2d(x, self.weight, self.bias, self.stride)
        return base + F.conv2d(F.conv2d(x, self.a, None, self.stride), self.b) * self.scaling


def _check(lean, ref, x, w, g, trained):
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    yr.backward(g)
    y, gx, gp, kept = lean_grads(lean, x, g, w, trained)
    assert rel_err(y, yr) < 1e-5
    assert rel_err(gx, xr.grad) < 1e-5
    params = dict(ref.named_parameters())
    names = {"bias": "base.bias" if "base.bias" in params else "bias",
             "lora_a": "lora_A.weight" if "lora_A.weight" in params else "a",
             "lora_b": "lora_B.weight" if "lora_B.weight" in params else "b"}
    assert set(gp) == set(trained)
    for role in trained:
        assert rel_err(gp[role], params[names[role]].grad) < 1e-5, role
    return kept


@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)], ids=["vectors", "tokens"])
def test_lora_linear_rule_matches_peft_autograd(shape):
    torch.manual_seed(0)
    w, bias = torch.randn(6, 12), torch.randn(6)
    a, b = torch.randn(3, 12), torch.randn(6, 3)  # B non-zero, so A's gradient is not trivially zero
    x, g = torch.randn(*shape), torch.randn(*shape[:-1], 6)
    wd = {"weight": w, "bias": bias, "lora_a": a, "lora_b": b}
    rule = LoraLinear(3, 8 / 3)
    if len(shape) == 2:
        rule = bind(rule, x, wd)
    kept = _check(rule, PeftLinear(w, bias, a, b, 8 / 3), x, wd, g, ALL)
    assert list(kept) == ["x"] and kept["x"] is x  # only the branch's input, no A·x, no weight gradient


class _OwnWeightTensors(dict):
    """A node's tensors as a program lowered with `linear_input_grad_own_weight` gives them: W frozen."""
    lowering = Lowering(linear_input_grad_own_weight=True)

    def trainable(self, role: str) -> bool:
        return role != "weight"


class _MatmulOperands(TorchFunctionMode):
    """The operands of every matmul (`@`) run under it."""

    def __init__(self):
        super().__init__()
        self.operands: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
            self.operands.extend(a for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_lora_linear_input_grad_reads_frozen_weight_as_its_own_transposed_constant():
    """As `Linear`: the input gradient through frozen W is F.linear(g, W^T), never g @ W (XNNPACK would pack W a
    second way under the same constant: `Lowering.linear_input_grad_own_weight`); exact against autograd."""
    torch.manual_seed(0)
    w, bias = torch.randn(6, 12), torch.randn(6)
    a, b = torch.randn(3, 12), torch.randn(6, 3)
    x, g = torch.randn(2, 7, 12), torch.randn(2, 7, 6)
    wd = _OwnWeightTensors(weight=w, bias=bias, lora_a=a, lora_b=b)
    with _MatmulOperands() as seen:
        _check(LoraLinear(3, 8 / 3), PeftLinear(w, bias, a, b, 8 / 3), x, wd, g, ALL)
    assert not any(t is w for t in seen.operands)


class _Int8WeightTensors(_OwnWeightTensors):
    """A node's tensors as a program lowered with `int8_frozen_linear` gives them: W frozen, also stored int8 (q, scale)
    for the rule to read as stored; counts those reads and the reads of W's fp32 (dequantized) copy."""
    lowering = Lowering(linear_input_grad_own_weight=True, int8_frozen_linear=True)

    def __init__(self, stored, **tensors):
        super().__init__(**tensors)
        self.stored, self.int8_reads, self.fp32_reads = stored, 0, 0

    def int8(self, role: str):
        self.int8_reads += role == "weight"
        return self.stored if role == "weight" else None

    def __getitem__(self, role: str):
        self.fp32_reads += role == "weight"
        return super().__getitem__(role)


def test_lora_linear_reads_int8_frozen_weight_as_stored():
    """`Lowering.int8_frozen_linear`: the forward W x and the input gradient through W read W's int8 (the form
    ExecuTorch's XNNPACK runs as its f32_qc8w linear), never an fp32 copy; the branch stays fp32. Exact against
    autograd on the dequantized W."""
    torch.manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(6, 12))
    w, bias = dequantize_per_channel(q, scale), torch.randn(6)
    a, b = torch.randn(3, 12), torch.randn(6, 3)
    x, g = torch.randn(2, 7, 12), torch.randn(2, 7, 6)
    wd = _Int8WeightTensors((q, scale), weight=w, bias=bias, lora_a=a, lora_b=b)
    _check(LoraLinear(3, 8 / 3), PeftLinear(w, bias, a, b, 8 / 3), x, wd, g, ALL)
    assert (wd.int8_reads, wd.fp32_reads) == (2, 0)  # forward and input gradient


def test_int8_frozen_linear_lowering_takes_lora_linears_frozen_weights():
    pm = edgetl.prepare("mnist_cnn", "lora", num_classes=10)
    lora_weights = {n.params["weight"] for n in pm.graph.nodes if isinstance(n.rule, LoraLinear)}
    assert lora_weights and all(pm.graph.is_quantized(t) for t in lora_weights)
    assert lora_weights <= Lowering(int8_frozen_linear=True).int8_linear_weights(pm.graph)
    assert not Lowering().int8_linear_weights(pm.graph)


class _Pointwise(nn.Module):
    """Two 1x1 convs at 8x8 over 32 and 64 channels: few positions per channel, the int8 linears' case."""

    def __init__(self):
        super().__init__()
        self.stem, self.c2, self.c3 = nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 1), nn.Conv2d(64, 64, 1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.stem(x)))))).mean((2, 3)))


def test_int8_pointwise_lowering_leaves_lora_convs_frozen_weights_fp32():
    # a LoRA 1x1 conv reads W as fp32 (its branch shares the op): kept int8 it was only dequantized in the step
    lowering = Lowering(int8_pointwise_linear=True)
    plain = edgetl.prepare(_Pointwise().eval(), "bias", num_classes=5, input_shape=(3, 16, 16))
    assert {"c2.weight", "c3.weight"} <= lowering.int8_linear_weights(plain.graph)
    pm = edgetl.prepare(_Pointwise().eval(), "lora", num_classes=5, input_shape=(3, 16, 16))
    lora_convs = {n.params["weight"] for n in pm.graph.nodes if isinstance(n.rule, LoraConv2d)}
    assert lora_convs == {"c2.weight", "c3.weight"}
    assert not lora_convs & lowering.int8_linear_weights(pm.graph)


@pytest.mark.parametrize("hw,stride", [((6, 5), 1), ((7, 9), 2), ((5, 5), (2, 1))])
def test_lora_conv1x1_rule_matches_peft_autograd(hw, stride):
    torch.manual_seed(0)
    w, bias = torch.randn(6, 4, 1, 1), torch.randn(6)
    a, b = torch.randn(3, 4, 1, 1), torch.randn(6, 3, 1, 1)
    x = torch.randn(2, 4, *hw)
    wd = {"weight": w, "bias": bias, "lora_a": a, "lora_b": b}
    stride = (stride, stride) if isinstance(stride, int) else stride
    rule = bind(LoraConv2d.around(Conv2d(1, stride), 3, 0.5), x, wd)
    g = torch.randn(2, *rule.out_shape)
    kept = _check(rule, PeftConv1x1(w, bias, a, b, 0.5, stride), x, wd, g, ALL)
    assert list(kept) == ["x"] and kept["x"].shape[2:] == g.shape[2:]  # the strided samples A reads
    _, _, gp, _ = lean_grads(rule, x, g, wd, frozenset({"lora_a"}))
    assert set(gp) == {"lora_a"}


def test_lora_recipe_trains_branches_and_head_over_int8_weights():
    pm = edgetl.prepare("mnist_cnn", "lora", num_classes=10)
    fc = pm.graph.node(next(n.name for n in pm.graph.nodes if isinstance(n.rule, LoraLinear)))
    assert pm.trainable == [fc.params["lora_a"], fc.params["lora_b"], "head.weight", "head.bias"]
    assert pm.stored[fc.params["weight"]][0].dtype == torch.int8  # frozen W stays int8
    a, b = pm.graph.tensors[fc.params["lora_a"]], pm.graph.tensors[fc.params["lora_b"]]
    assert a.shape == (4, 1152) and b.shape == (256, 4) and not b.any()
    bound = 1 / math.sqrt(1152)  # peft / nn.Linear: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert fc.rule.scale == 2.0  # alpha 8 / r 4
    both = edgetl.prepare("mnist_cnn", "bias+lora8", num_classes=10)
    assert both.notes["lora"]["rank"] == 8 and "conv_layers.0.bias" in both.trainable
    only_3x3 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(RecipeError, match="no frozen Linear or 1×1 conv"):
        edgetl.prepare(only_3x3, "lora", num_classes=3, input_shape=(1, 8, 8))


def test_lora_attaches_to_1x1_convs_only():
    model = FAMILIES["mobilenet_v3"]()
    pm = edgetl.prepare(model, "lora", num_classes=5, input_shape=model.input_shape)
    lora = [n for n in pm.graph.nodes if isinstance(n.rule, (LoraLinear, LoraConv2d))]
    plain = [n for n in pm.graph.nodes if type(n.rule) in (Conv2d, Linear) and n.name != pm.head]
    assert any(isinstance(n.rule, LoraConv2d) for n in lora)
    assert all(n.rule.kernel != (1, 1) or n.rule.groups > 1 for n in plain)
    assert pm.notes["lora"]["layers"] == len(lora)


def test_lora_memory_counts_the_branch_inputs_and_no_weight_gradient():
    pm = edgetl.prepare("mnist_cnn", "lora", num_classes=10)
    mem = pm.memory(8)
    (k,) = [k for k in mem.kept if k.layer.endswith("+lora4")]
    assert k.name == "x" and k.shape == [8, 1152] and k.bytes == 8 * 1152 * 4
    params = sum(pm.graph.tensors[t].numel() for t in pm.trainable) * 4
    assert mem.trainable_params_bytes == params and mem.gradients_bytes == params
    assert mem.optimizer_state_bytes == params  # sgd with momentum: one buffer per parameter
    head_only = edgetl.prepare("mnist_cnn", "head", num_classes=10).memory(8)
    assert mem.kept_activations_bytes > head_only.kept_activations_bytes


STEP_OPT = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)


def _family(name, recipe):
    model = FAMILIES[name]()
    return edgetl.prepare(model, recipe, num_classes=5, input_shape=model.input_shape)


@pytest.mark.parametrize("name,recipe", [("mobilenet_v3", "bias+lora+mask"), ("resnet18", "lora"),
                                         ("efficientnet_b0", "lora+q8")])  # resnet18: strided 1×1 shortcuts
def test_family_lora_step_matches_autograd(name, recipe):
    pm = _family(name, recipe)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, *pm.input_shape, generator=g), torch.randint(0, 5, (2,), generator=g)
    gerr, perr = lean_vs_reference(pm, x, y, OptimizerConfig.make("sgd", lr=0.5), steps=2)
    assert max(gerr.values()) < 1e-4 and max(perr.values()) < 1e-4


def _fit_matches_torch(tmp_path, pm, target, steps=3):
    """`steps` exported steps on the torch-free runtime match the torch lean step; returns the trainer."""
    from edgetl.exporters import export
    from edgetl.runtime import Trainer
    from edgetl.runtime.data import normalize

    trainer = Trainer.load(export(pm, target, tmp_path / "b", STEP_OPT, batch_size=4))
    rng = np.random.default_rng(0)
    x = rng.random((4, *pm.input_shape), dtype=np.float32)
    y = rng.integers(0, pm.num_classes, 4)
    step = pm.step_module(STEP_OPT)
    params = pm.initial_params()
    state = step.init_state(params)
    xt = torch.from_numpy(normalize(x, trainer.bundle.manifest))
    for _ in range(steps):
        _, _, params, state, _ = step.run(xt, torch.from_numpy(y), STEP_OPT.lr, params, state)
        trainer._train_step(trainer._x(x), y.astype(np.int64))
    got = trainer.backend.get_state()
    for t in pm.trainable:
        ref = params[t].numpy()
        assert np.abs(got[t] - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), t
    b = [t for t in pm.trainable if t.endswith("lora_b")]
    assert all(np.abs(got[t]).max() > 0 for t in b)  # the branches did train
    return trainer, x


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "bias+lora+mask"])
def test_mnist_lora_fits_on_onnx_like_torch_and_merges(tmp_path, recipe):
    import onnx
    import onnxruntime as ort

    pm = edgetl.prepare("mnist_cnn", recipe, num_classes=10)
    trainer, x = _fit_matches_torch(tmp_path, pm, "onnx")
    (path,) = trainer.export_inference(tmp_path / "model.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # the original architecture: one Gemm/Conv per layer, merged weights as initializers, no inputs but x
    assert [i.name for i in model.graph.input] == ["x"]
    layers = sum(1 for n in pm.graph.nodes if isinstance(n.rule, (Linear, Conv2d)))
    assert sum(1 for n in model.graph.node if n.op_type in ("Gemm", "Conv", "MatMul")) == layers
    merged = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    trained = trainer.backend.logits(trainer._x(x))
    assert np.abs(merged - trained).max() <= 1e-4 * max(1.0, float(np.abs(trained).max()))
    _lora_file_is_safetensors_and_old_npz_still_merges(trainer, tmp_path)
    _bad_lora_entry_is_refused(trainer.bundle.root, tmp_path)


def _lora_file_is_safetensors_and_old_npz_still_merges(trainer, tmp_path):
    """The lora file is safetensors (any language reads it, no pickle); a bundle exported before
    it, whose lora file is an npz, merges to the same weights."""
    import json
    import shutil

    from edgetl.runtime import Trainer, safetensors
    from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256
    from edgetl.runtime.lora_merge import merged_weights

    root = trainer.bundle.root
    m = json.loads((root / "manifest.json").read_text())
    assert m["lora"]["file"] == "lora.safetensors" and "lora.safetensors" in m["files"]
    arrays, meta = safetensors.decode((root / "lora.safetensors").read_bytes())
    assert meta["format"] == "edgetl-lora" and any(a.dtype == np.int8 for a in arrays.values())
    params = dict(zip(trainer.bundle.trainable, trainer.backend.params))
    new = merged_weights(trainer.bundle, params)

    old = tmp_path / "old_bundle"
    shutil.copytree(root, old)
    (old / "lora.safetensors").unlink()
    np.savez(old / "lora.npz", **arrays)
    del m["files"]["lora.safetensors"]
    m["files"]["lora.npz"] = sha256(old / "lora.npz")
    m["lora"]["file"] = "lora.npz"
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (old / "manifest.json").write_text(json.dumps(m))
    got = merged_weights(Trainer.load(old).bundle, params)
    assert got.keys() == new.keys() and all(np.array_equal(got[k], new[k]) for k in new)


def _bad_lora_entry_is_refused(root, tmp_path, name="bad.onnx"):
    import json

    from edgetl.runtime import Trainer
    from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest
    from edgetl.runtime.errors import BundleError

    m = json.loads((root / "manifest.json").read_text())
    m["lora"]["layers"][0]["shape"][1] += 1
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="lora layer 'merged.0' does not match"):
        Trainer.load(root).export_inference(tmp_path / name)
    assert not (tmp_path / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "bias+lora+mask"])
def test_family_with_1x1_convs_fits_lora_on_onnx_like_torch_and_merges(tmp_path, recipe):
    import onnxruntime as ort

    pm = _family("mobilenet_v3", recipe)
    trainer, x = _fit_matches_torch(tmp_path, pm, "onnx")
    (path,) = trainer.export_inference(tmp_path / "model.onnx")
    merged = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    trained = trainer.backend.logits(trainer._x(x))
    assert np.abs(merged - trained).max() <= 1e-4 * max(1.0, float(np.abs(trained).max()))


@pytest.mark.slow
def test_mnist_lora_fits_on_executorch_like_torch_and_merges(tmp_path):
    import json

    pytest.importorskip("executorch")
    from edgetl.runtime.backends.executorch import NativeMethod

    pm = edgetl.prepare("mnist_cnn", "bias+lora+mask", num_classes=10)
    trainer, x = _fit_matches_torch(tmp_path, pm, "executorch")
    pte, npz, meta = trainer.export_inference(tmp_path / "model.pte")
    side = json.loads(meta.read_text())
    # the original layers: the merged weights (one per LoRA layer) are inputs, no A or B
    branch = {t for t in pm.trainable if t.endswith(("lora_a", "lora_b"))}
    layers = sum(1 for n in pm.graph.nodes if isinstance(n.rule, (LoraLinear, LoraConv2d)))
    assert side["inputs"][1:] == [t for t in pm.trainable if t not in branch] + [f"merged.{i}" for i in range(layers)]
    with np.load(npz) as z:
        params = [z[side["params_keys"][n]] for n in side["inputs"][1:]]
    merged = NativeMethod(pte.read_bytes())([trainer._x(x), *params])[0]
    trained = trainer.backend.logits(trainer._x(x))
    assert np.abs(merged - trained).max() <= 1e-4 * max(1.0, float(np.abs(trained).max()))
    _bad_lora_entry_is_refused(trainer.bundle.root, tmp_path, "bad.pte")
