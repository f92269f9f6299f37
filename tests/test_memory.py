"""The analytic memory model, checked against hand-counted small nets."""
import pytest
import torch.nn as nn

import edgetl


def _tiny():
    # conv 1->2 (3x3, no bias: edgetl adds a zero one), ReLU, flatten, linear 32->2
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))


def test_tiny_net_bias_by_hand():
    m = edgetl.prepare(_tiny(), "bias", num_classes=2, input_size=4).memory(batch_size=2)
    # frozen: conv weight 18 int8 + 2 fp32 scales = 26 B
    assert m.frozen_weights_bytes == 18 + 2 * 4
    # trainable: conv bias 2 + head weight 2x32 + head bias 2, fp32
    assert m.trainable_params_bytes == (2 + 64 + 2) * 4 == 272
    assert m.optimizer_state_bytes == 272  # one momentum buffer each
    assert m.input_bytes == 2 * 16 * 4 + 2 * 8  # batch + int64 labels
    # kept: the ReLU output (2x2x4x4 fp32 = 256 B), shared with the head's kept input
    assert m.kept_activations_bytes == 256
    # peak: inside the ReLU backward g * (y > 0).float(): live are the logits 16, their gradient 16,
    # the loss 4, head grads 8+256, the kept ReLU output 256, the incoming gradient 256, the mask
    # cast to float 256 and the product 256
    assert m.transient_peak_bytes == 16 + 16 + 4 + 264 + 256 + 256 + 256 + 256
    assert m.analytic_peak_bytes == 26 + 272 + 272 + 144 + 1324


def test_tiny_net_bias_mask_by_hand():
    m = edgetl.prepare(_tiny(), "bias+mask", num_classes=2, input_size=4).memory(batch_size=2)
    # kept: a bool mask of 64 elements (64 B) plus the head's fp32 input (256 B)
    assert m.kept_activations_bytes == 64 + 256
    # peak: inside the ReLU backward; as above, with the 64 B mask kept instead of the 256 B
    # output (the head's kept input was freed after the head's backward)
    assert m.transient_peak_bytes == 16 + 16 + 4 + 264 + 64 + 256 + 256 + 256
    assert m.analytic_peak_bytes == 26 + 272 + 272 + 144 + 1132


def test_a_kept_batch_counts_once():
    """`full` trains the first conv's weight, whose gradient keeps the batch x itself. The batch is
    resident for the whole step (input_bytes), so the transient peak must not count it again (it
    did: ResNet-18-like `full` measured 0.78x the model, 1.02x without the double count)."""
    m = edgetl.prepare(_tiny(), "full", num_classes=2, input_size=4).memory(batch_size=2)
    assert ("0", "x", [2, 1, 4, 4]) in [(k.node, k.name, k.shape) for k in m.kept]  # the conv keeps the batch
    assert m.input_bytes == 2 * 16 * 4 + 2 * 8
    # peak in the ReLU backward, while the conv still keeps x: 1452 with the batch counted a second time
    assert m.peak_at == "grad:1"
    assert m.transient_peak_bytes == 1324
    assert m.analytic_peak_bytes == m.frozen_weights_bytes + 2 * m.trainable_params_bytes + m.input_bytes + 1324


def test_head_only_keeps_only_the_features():
    m = edgetl.prepare(_tiny(), "head", num_classes=2, input_size=4).memory(batch_size=2)
    assert [k.node for k in m.kept] == ["3"] and m.kept_activations_bytes == 256
    assert m.frozen_weights_bytes == 26 + 8  # the conv bias is frozen too now


def test_adamw_state_is_twice_sgd():
    pm = edgetl.prepare(_tiny(), "bias", num_classes=2, input_size=4)
    sgd = pm.memory(2)
    adamw = pm.memory(2, edgetl.OptimizerConfig.make("adamw"))
    assert adamw.optimizer_state_bytes == 2 * sgd.optimizer_state_bytes + 4  # + the step counter


@pytest.fixture(scope="module")
def lite0():
    return {r: edgetl.prepare("efficientnet_lite0", r, num_classes=10, input_size=128).memory(8)
            for r in ["full", "bias", "bias+mask", "side", "side+mask"]}


def test_recipes_order_as_expected_on_lite0(lite0):
    peak = {r: m.analytic_peak_bytes for r, m in lite0.items()}
    assert peak["full"] > peak["bias"] > peak["bias+mask"]
    assert peak["side"] < peak["bias+mask"]
    assert lite0["bias+mask"].kept_activations_bytes < lite0["bias"].kept_activations_bytes / 3
    # int8 frozen weights: about a quarter of fp32
    assert lite0["bias"].frozen_weights_bytes < 0.3 * lite0["full"].trainable_params_bytes


def test_breakdown_is_json_ready(lite0):
    import json

    d = lite0["bias+mask"].breakdown()
    json.dumps(d)
    assert {"frozen_weights_bytes", "kept", "analytic_peak_bytes", "peak_at"} <= set(d)
    assert all(k["dtype"] == "bool" and k["bits"] == 8 for k in d["kept"] if "mask" in k["layer"])


@pytest.mark.slow
# bias+mask+q8 is left out: the analytic model over-counts the SiLU q8 forward's temporaries, measured
# 0.81-0.87 of analytic depending on load and input size (issue 9 notes).
@pytest.mark.parametrize("family, size, batch, recipe", [("efficientnet_b0", None, 32, "bias+mask"),
                                                         ("resnet18", 128, 8, "bias+mask")])
def test_analytic_within_15_percent_of_measured_on_a_new_rule_model(tmp_path, family, size, batch, recipe):
    """EfficientNet-B0-like (SiLU exact or 8-bit kept, Sigmoid SE gates and their products, padded
    depthwise convs, global average pooling) at batch 32, about 10 MB of step memory, and ResNet-18-like
    (3x3/s2/p1 max pool, residual adds, ReLU masks) at 128x128 batch 8, about 3 MB; `onnx` target,
    measured by the device profiler in its own process (glibc returning freed blocks to the system)."""
    import json
    import subprocess
    import sys

    from edgetl.exporters import export
    from families import FAMILIES

    model = FAMILIES[family]()
    shape = model.input_shape if size is None else (model.input_shape[0], size, size)
    pm = edgetl.prepare(model, recipe, num_classes=10, input_shape=shape)
    bundle = export(pm, "onnx", tmp_path / "b", batch_size=batch)
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "3", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["analytic_step_bytes"] > 3 * 2**20  # big enough that allocator noise is a few percent
    assert 0.85 <= out["measured_vs_analytic"] <= 1.15, (out["measured_peak_bytes"], out["analytic_step_bytes"])
