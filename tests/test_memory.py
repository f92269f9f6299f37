"""The analytic memory model, checked against hand-counted small nets."""
import pytest
import torch.nn as nn

import edgetl
from edgetl.lowering import runs_nchwc
from edgetl.memory import Tracker


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
    # peak: the head weight's update, run (as onnxruntime runs it) as soon as its gradient exists,
    # mid-backward: live are the kept ReLU output 256, the logits 16, the loss 4, their gradient 16,
    # the learning rate 4, the head's gradients 8+256 and input gradient 256, the head bias's new
    # value and momentum 8+8, and the weight's new momentum, lr times it and new value 3 x 256
    assert m.transient_peak_bytes == 256 + 16 + 4 + 16 + 4 + 264 + 256 + 16 + 3 * 256
    assert m.analytic_peak_bytes == 26 + 272 + 272 + 144 + 1600


def test_tiny_net_bias_mask_by_hand():
    m = edgetl.prepare(_tiny(), "bias+mask", num_classes=2, input_size=4).memory(batch_size=2)
    # kept: a bool mask of 64 elements (64 B) plus the head's fp32 input (256 B)
    assert m.kept_activations_bytes == 64 + 256
    # peak: the head weight's update, as above (the ReLU output is the head's kept input), plus the mask
    assert m.transient_peak_bytes == 1600 + 64
    assert m.analytic_peak_bytes == 26 + 272 + 272 + 144 + 1664


def test_a_kept_batch_counts_once():
    """`full` trains the first conv's weight, whose gradient keeps the batch x itself. The batch is
    resident for the whole step (input_bytes), so the transient peak must not count it again (it
    did: ResNet-18-like `full` measured 0.78x the model, 1.02x without the double count)."""
    m = edgetl.prepare(_tiny(), "full", num_classes=2, input_size=4).memory(batch_size=8)
    assert ("0", "x", [8, 1, 4, 4]) in [(k.node, k.name, k.shape) for k in m.kept]  # the conv keeps the batch
    assert m.input_bytes == 8 * 16 * 4 + 8 * 8
    # peak at the ReLU's derivative, made (as onnxruntime does) before the head's input gradient passes
    # the flatten, while the conv still keeps x: the kept ReLU output 1024, logits, loss, their gradient
    # and lr 64+4+64+4, the head's input gradient 1024, its updated params and momenta 16+512, the bool
    # y > 0 256 and its float copy 1024; 3992 + 512 with the batch counted a second time
    assert m.peak_at == "grad:2"
    assert m.transient_peak_bytes == 1024 + 136 + 1024 + 528 + 256 + 1024 == 3992
    assert m.analytic_peak_bytes == m.frozen_weights_bytes + 2 * m.trainable_params_bytes + m.input_bytes + 3992


def test_onnxruntime_where_holds_two_selections_beside_its_output():
    """onnxruntime's CPU Where makes `cond ? X : 0` and `cond ? 0 : Y` (each the condition's
    broadcast with its value) before merging them into its output: three output sizes at once
    (the max pool's running max; ResNet-18-like bias+mask measured 1.16x the model without them)."""
    import torch

    from edgetl.memory import Tracker, _Observe

    cond = torch.empty(8, 100, dtype=torch.bool, device="meta")
    a, b = torch.empty(8, 100, device="meta"), torch.empty(1, 100, device="meta")
    peaks = {}
    for ort in (False, True):
        tracker = Tracker()
        with _Observe(tracker, ort_kernels=ort):
            y = torch.where(cond, a, b)
            z = torch.where(cond, 1.0, y)  # a scalar X: its selection is the condition's size
        peaks[ort] = tracker.peak
        del y, z
    # y and z (+ 4 B: the scalar as a tensor); with onnxruntime's kernels, y beside z's selections and z
    assert peaks == {False: 2 * 3200 + 4, True: 3200 + 3 * 3200 + 4}


@pytest.mark.parametrize("args, hw", [((3, 2, 1), (17, 16)), ((3, 2, 0, 1, True), (9, 10))])
def test_max_pool_replayed_as_onnxruntime_runs_it_is_the_same_pool(args, hw):
    """The analytic replay's max pool (its row and tap copies, positions chosen after the running
    max, as onnxruntime runs the exported one) gives the forward's maximum and positions, ties too."""
    import torch
    import torch.nn.functional as F

    from edgetl.rules import Need
    from edgetl.rules.pool import MaxPool

    x = torch.randn(2, 3, *hw)
    x[:, :, :3, :3] = 1.0
    rule = MaxPool(*args)
    rule.on_bind([tuple(x.shape[1:])], tuple(F.max_pool2d(x, *args).shape[1:]))
    y, kept = rule.forward([x], {}, Need((True,), frozenset()))
    y_ort, kept_ort = rule._as_onnxruntime_runs_it([x])
    assert torch.equal(y_ort, F.max_pool2d(x, *args)) and torch.equal(y_ort, y)
    assert torch.equal(kept_ort["i"], kept["i"])


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
# bias+mask+q8 is left out: replayed in onnxruntime's order it reads 0.97-1.21 of analytic over 15 runs (one
# above 1.15: the measured step spreads 6.5-8.2 MB on a 6.75 MB model, BENCHMARKS.md task O notes).
@pytest.mark.parametrize("family, size, batch, recipe", [("efficientnet_b0", None, 32, "bias+mask"),
                                                         ("resnet18", 128, 8, "bias+mask")])
def test_analytic_within_15_percent_of_measured_on_a_new_rule_model(tmp_path, family, size, batch, recipe):
    """EfficientNet-B0-like (SiLU exact or 8-bit kept, Sigmoid SE gates and their products, padded
    depthwise convs, global average pooling) at batch 32, about 10 MB of step memory, and ResNet-18-like
    (3x3/s2/p1 max pool, residual adds, ReLU masks) at 128x128 batch 8, about 2.7 MB; `onnx` target,
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
    runs = []
    for _ in range(5):  # one profile run is under a second
        r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "3", "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    assert runs[0]["analytic_step_bytes"] > 2.5 * 2**20
    # One process's peak RSS above its pre-step level spreads: ResNet-18-like 128 b8 read 0.84-1.05 of the
    # analytic model over 30 runs (2 below 0.85; CI once read 0.80), so the test judges the median of five.
    ratios = sorted(r["measured_vs_analytic"] for r in runs)
    assert 0.85 <= ratios[2] <= 1.15, (ratios, runs[0]["analytic_step_bytes"])


def test_q8_silu_keep_is_replayed_after_the_next_depthwise_conv():
    """onnxruntime runs the depthwise conv after a q8 SiLU before the SiLU's quantized derivative, whose
    sigmoid is the input's last read (traced: EfficientNet-B0-like bias+mask+q8, 0.86x the model when
    the replay made the derivative first with the input alive). Live at the peak: SiLU's output y, the
    sigmoid s, 1 - s and y(1 - s), and the stride-2 conv's output (a quarter size): not the input too."""
    net = nn.Sequential(nn.Conv2d(1, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    m = edgetl.prepare(net, "bias+q8", num_classes=2, input_size=16).memory(batch_size=4)
    a = 4 * 8 * 16 * 16 * 4  # one activation of SiLU's size
    assert ("1", "q", "uint8") in [(k.node, k.name, k.dtype) for k in m.kept]
    assert 4 * a + a // 4 <= m.transient_peak_bytes < 4 * a + a // 4 + 1024  # 5a + 96 B in the old order


def test_a_frozen_conv_is_replayed_as_onnxruntime_runs_it():
    """The exporter folds a zero Pad into the Conv (no padded copy); a frozen conv's input dies before its
    bias Add; a frozen depthwise conv reads an NCHWc copy of its input, which replaces the input where
    every user reads it so (malloc-traced, Lite0 224 b8 `side`: 73.5 MB, the model said 121.0 before).
    Live at the peak: two activations, a first conv's output and its bias sum (its input is the batch), or
    the depthwise conv's input and its copy; with the padded copy 3.5, with the input beside its copy 2.25."""
    net = nn.Sequential(nn.Conv2d(1, 16, 1), nn.Conv2d(16, 16, 1), nn.ZeroPad2d((0, 1, 0, 1)),
                        nn.Conv2d(16, 16, 3, stride=2, groups=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 2))
    pm = edgetl.prepare(net, "head", num_classes=2, input_size=16)
    assert [n.rule.pads for n in pm.graph.nodes if n.rule.kind == "conv2d"][-1] == (0, 1, 0, 1)
    a = 4 * 16 * 16 * 16 * 4  # one activation
    m = pm.memory(batch_size=4)
    assert 2 * a <= m.transient_peak_bytes < 2 * a + 2048  # + the dequantized weights and biases


def _side_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(16, width, 3, padding=1),
                         nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(width * 9, 2))


def test_side_taps_live_until_the_backbone_ends():
    """onnxruntime runs a side-tuned step's frozen backbone to its end before the ladder (its order walks
    back from the outputs; profiled on mnist_cnn `side`), so a tap lives beside every later layer, where the
    graph's order runs each ladder stage right after its tap. Here the 14 x 14 tap A (one activation a) is
    alive at the peak, the wide conv's output and bias sum (2a each) and its dequantized weight; its input
    (the pooled ReLU) died before the bias sum."""
    pm = edgetl.prepare(_side_net(128), "side", num_classes=2, input_size=14)
    assert pm.notes["side"]["taps"][0] == "0"
    a = 4 * 16 * 14 * 14 * 4
    weight = 128 * 16 * 9 * 4 + 2 * 128 * 4  # fp32 while the conv runs, and its bias twice (dequantized, shifted)
    assert pm.memory(batch_size=4).transient_peak_bytes == a + 2 * 2 * a + weight


@pytest.mark.skipif(not runs_nchwc(16), reason="this CPU has no MLAS NCHWc kernels (no AVX2)")
def test_a_frozen_max_pool_reads_an_nchwc_copy_beside_a_side_tap():
    """onnxruntime runs a pool over a multiple of 16 channels (AVX-512; the MaxPool a frozen pool exports as)
    in NCHWc, on a reordered copy of its input, and makes no int64 positions (torch's max_pool2d does).
    mnist_cnn `side` b32, malloc-traced: the stem's tap, its copy and the pooled output, 6.91 MB (model 6.13
    before, 6.89 now). Here: the tap (a), its copy (a) and the pool's output (a / 4)."""
    m = edgetl.prepare(_side_net(16), "side", num_classes=2, input_size=14).memory(batch_size=4)
    a = 4 * 16 * 14 * 14 * 4
    assert 2 * a + a // 4 <= m.transient_peak_bytes < 2 * a + a // 4 + 1024


def test_exact_gelu_is_replayed_as_its_five_exported_ops():
    """The exported exact GELU is x / sqrt(2), Erf, + 1, times x, times 1/2, five ops in onnxruntime: the
    input, the quotient and the Erf are alive at once (DeiT-like `side` 224 b8, malloc-traced: three MLP-hidden
    tensors at the peak, 19.7 MB; the model said 16.3 with torch's one-op gelu)."""
    net = nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Flatten(), nn.Linear(8 * 64, 2))
    m = edgetl.prepare(net, "head", num_classes=2, input_shape=(8, 4)).memory(batch_size=16)
    h = 16 * 8 * 64 * 4  # one hidden activation
    assert 3 * h <= m.transient_peak_bytes < 3 * h + 1024


@pytest.mark.skipif(not runs_nchwc(16), reason="this CPU has no MLAS NCHWc kernels (no AVX2)")
def test_an_nchwc_copy_read_by_every_user_replaces_the_value():
    """A value every user of which runs in NCHWc is reordered once and read so by all of them: onnxruntime's
    NCHWc transform shares one ReorderInput, and the original dies once copied (profiled, Lite0 `side`: each
    tap feeds a depthwise conv and the ladder's AveragePool, both on the one copy). Here the 12 x 12 tap is
    read by the stem pool and the ladder's 4 x 4 average pool: at the peak the tap and its copy while copying
    (2a), not the tap, its copy and the pooled output (2.25a)."""
    m = edgetl.prepare(_side_net(16), "side", num_classes=2, input_size=12).memory(batch_size=4)
    a = 4 * 16 * 12 * 12 * 4
    assert 2 * a <= m.transient_peak_bytes < 2 * a + 1024


@pytest.mark.skipif(not runs_nchwc(16), reason="this CPU has no MLAS NCHWc kernels (no AVX2)")
def test_a_ladder_mask_pinned_to_the_backbone_runs_before_it():
    """With `mask`, the exported step pins each ladder ReLU's mask to the next node with a bias or a max
    pool (exact zeros), so onnxruntime runs that ladder stage, with its tap's pooling, before it: the
    14 x 14 tap has died into its copy by the stem pool's output (mnist_cnn `side+mask`, traced 6.24 MB;
    6.89 modelled with the tap alive to the backbone's end). At the peak: the tap and its copy (2a) and the
    ladder's first stage (3 x 3 maps, ~5 KB), not the tap beside its copy and the pooled output (2.25a)."""
    m = edgetl.prepare(_side_net(16), "side+mask", num_classes=2, input_size=14).memory(batch_size=4)
    a = 4 * 16 * 14 * 14 * 4
    assert 2 * a <= m.transient_peak_bytes < 2 * a + a // 8


def test_a_tiled_max_pool_backward_frees_the_gradient_before_its_stack():
    """onnxruntime frees a 2x2 max pool's incoming gradient and its float positions once the last tap's
    Where is made, before their Concat (profiled, mnist_cnn `full` b32: traced 9.11 MB, modelled 10.83 with
    both held to the end of the rule, 9.49 now). Here the peak is that pool's backward: 2.38 activations of
    the stem (2.57 with the gradient held)."""
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 49, 2))
    m = edgetl.prepare(net, "bias+mask", num_classes=2, input_size=14).memory(batch_size=4)
    a = 4 * 16 * 14 * 14 * 4
    assert m.peak_at == "grad:1" and 2.3 * a < m.transient_peak_bytes < 2.45 * a


def test_a_mask_dies_once_its_float_copy_exists():
    """onnxruntime frees a ReLU6's bool mask once it is cast to float (its last read), before the product
    with the gradient (traced, MobileNetV2 224 b8 `bias+mask`: gradient, float mask and product at the peak,
    116.7 MB; the model held the bool mask too, 125.8, now 116.6). Here: 3.26 activations at the peak, 3.51
    with the bool masks (a / 4 each) held to the end of their rule's backward."""
    net = nn.Sequential(nn.Conv2d(1, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    m = edgetl.prepare(net, "bias+mask", num_classes=2, input_size=16).memory(batch_size=4)
    a = 4 * 16 * 16 * 16 * 4
    assert 3.2 * a < m.transient_peak_bytes < 3.3 * a


class _Events(Tracker):
    """A tracker that records the order of its holds and releases by name."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def hold(self, key, t, kind=""):
        self.events.append(f"hold {key}")
        super().hold(key, t, kind)

    def release(self, key):
        if key in self.holders:
            self.events.append(f"release {key}")
        super().release(key)


@pytest.mark.parametrize("recipe, key, inside", [("bias+mask", "m", True), ("bias", "d", False)])
def test_an_activation_drops_only_its_mask_inside_its_backward(monkeypatch, recipe, key, inside):
    """In onnxruntime's schedule a Hard-Swish frees its bool mask inside its backward (cast to float, its last
    read), but the float derivative it keeps without the mask modifier (its local derivative, made from x
    early) only after its backward (the product reads it): the replay releases the kept tensor before the
    input gradient exists only for the mask."""
    import edgetl.memory as memory

    trackers = []
    monkeypatch.setattr(memory, "Tracker", lambda: trackers.append(_Events()) or trackers[-1])
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Hardswish(), nn.Flatten(),
                        nn.Linear(4 * 16, 2))
    pm = edgetl.prepare(net, recipe, num_classes=2, input_size=4)
    pm.memory(batch_size=2)
    act = next(n for n in pm.graph.nodes if n.rule.kind == "hardswish")
    events = trackers[-1].events
    dropped = events.index(f"release kept:{act.name}:{key}")
    grad_in = events.index(f"hold grad:{act.inputs[0]}")
    assert (dropped < grad_in) == inside, events[grad_in - 3: grad_in + 3]
