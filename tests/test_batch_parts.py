"""`Lowering.batch_parts_carried`: a strided depthwise input gradient computed by batch parts is carried on, part by
part, through the per-sample backward rules that follow (masks, conv bias sums, input gradients), never joined by a
cat; exact against the eager step, and in ExecuTorch with the masks still int8 inside XNNPACK."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import edgetl
from edgetl.lowering import EAGER, Lowering
from edgetl.memory import Tracker
from edgetl.optim import OptimizerConfig

B, SIZE = 3, 8
# the zero-inserted gradient of the 16-channel stride-2 depthwise conv: 16 x (4 x 2)^2 fp32 per sample, so a limit
# of two samples gives the uneven parts [2, 1]
SPLIT = 2 * 16 * 8 * 8 * 4
CARRIED = Lowering(zero_inserted_depthwise_input_grad=True, zero_inserted_split_bytes=SPLIT, batch_parts_carried=True)


def _cnn() -> nn.Module:
    def block(cin, cout, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU6()] if act else layers

    torch.manual_seed(0)
    # Lite0's first blocks: stem, depthwise + project, expand + stride-2 depthwise + project
    net = nn.Sequential(*block(3, 8, 3), *block(8, 8, 3, 1, 8), *block(8, 8, act=False), *block(8, 16),
                        *block(16, 16, 3, 2, 16), *block(16, 8, act=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def prepared():
    return edgetl.prepare(_cnn(), "bias+mask", num_classes=4, input_shape=(3, SIZE, SIZE))


def _batch(shape=(3, SIZE, SIZE)):
    g = torch.Generator().manual_seed(1)
    return torch.rand((B, *shape), generator=g), torch.randint(0, 4, (B,), generator=g)


class _BackwardConvBatches(TorchDispatchMode):
    """The batch size of each convolution and whether a cat ran, in order."""

    def __enter__(self):
        self.convs, self.cats = [], 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.convs.append(int(out.shape[0]))
        self.cats += func is torch.ops.aten.cat.default
        return out


def _grads(pm, lowering: Lowering, shape=(3, SIZE, SIZE)):
    from edgetl.step import LeanStep

    step = LeanStep(pm, OptimizerConfig.make("sgd", lr=0.1), lowering)
    x, y = _batch(shape)
    with _BackwardConvBatches() as seen:
        grads = step.program.loss_and_grads(x, y, pm.initial_params())[2]
    return grads, seen


def _assert_same_grads(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-5, atol=1e-6), name


def test_carried_batch_parts_match_the_eager_step_with_no_cat(prepared):
    want, _ = _grads(prepared, EAGER)
    got, seen = _grads(prepared, CARRIED)
    _assert_same_grads(got, want)
    assert seen.cats == 0


def test_each_batch_part_runs_through_the_whole_chain_before_the_next(prepared):
    """Split [2, 1]: part [2] is made (its zero-inserted conv) and runs every input gradient conv of the chain down to
    the stem (the expand's, the project's, the depthwise's), then part [1]: one part's values are alive at a time."""
    _, seen = _grads(prepared, CARRIED)
    assert [b for b in seen.convs if b != B] == [2] * 4 + [1] * 4, seen.convs


def test_without_carrying_the_parts_are_joined(prepared):
    low = dataclasses.replace(CARRIED, batch_parts_carried=False)
    want, _ = _grads(prepared, EAGER)
    got, seen = _grads(prepared, low)
    assert seen.cats == 1
    _assert_same_grads(got, want)


def test_executorch_step_with_carried_parts_matches_torch(prepared, tmp_path, monkeypatch):
    """Exported with XNNPACK: no cat and no bool op on ExecuTorch's kernels (each part's slice of an int8 mask is
    dequantized and applied inside XNNPACK), and two steps match the torch lean step."""
    ops = _executorch_steps_match_torch(prepared, SPLIT, tmp_path, monkeypatch)
    # (the loss's one `where`)
    assert not any(k in op for op in ops for k in ("cat", "gt", "lt", "logical", "bitwise")), ops
    assert ops.get("aten::where", 0) == 1, ops


def _executorch_steps_match_torch(prepared, split: int, tmp_path, monkeypatch, shape=(3, SIZE, SIZE)) -> dict:
    """Two ExecuTorch steps (`DELEGATED` with batch parts of `split` bytes) == two torch lean steps; the train step's
    portable op kinds."""
    pytest.importorskip("executorch")
    from edgetl.exporters import executorch as et_exporter
    from edgetl.exporters import export
    from edgetl.runtime import Trainer
    from edgetl.runtime.data import normalize

    carried = dataclasses.replace(et_exporter.DELEGATED, zero_inserted_split_bytes=split)
    monkeypatch.setattr(et_exporter, "DELEGATED", carried)
    opt = OptimizerConfig.make("sgd", lr=0.1, momentum=0.9)
    bundle = export(prepared, "executorch", tmp_path / "b", opt, batch_size=B)
    ops = json.loads((bundle / "manifest.json").read_text())["executorch"]["train_step_ops"]["portable_op_kinds"]
    trainer = Trainer.load(bundle)
    x, y = _batch(shape)
    trainer.fit(x.numpy(), y.numpy(), epochs=2)
    step = prepared.step_module(opt)
    params = prepared.initial_params()
    state = step.init_state(params)
    xt = torch.from_numpy(normalize(x.numpy(), trainer.bundle.manifest))
    for _ in range(2):
        _, _, params, state, _ = step.run(xt, y, opt.lr, params, state)
    got = trainer.get_state()
    for name, want in {**params, **state}.items():
        np.testing.assert_allclose(got[name], want.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    return ops


class _Residual(nn.Module):
    """x + relu6(bn(conv1x1(x))): the sum is read by two rules, so carried parts stop (are joined) there."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())

    def forward(self, x):
        return x + self.body(x)


def test_parts_are_joined_where_a_rule_that_is_not_per_sample_reads_them():
    """The chain from the split stops at the residual sum's input (the add is not a per-sample rule here and the
    sum has two readers): the parts are joined there by one cat; exact against the eager step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU6(), _Residual(8), nn.Conv2d(8, 16, 1), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4)).eval()
    pm = edgetl.prepare(net, "bias+mask", num_classes=4, input_shape=(3, SIZE, SIZE))
    want, _ = _grads(pm, EAGER)
    got, seen = _grads(pm, CARRIED)
    assert seen.cats == 1
    _assert_same_grads(got, want)


# Two stride-2 depthwise convs joined only by per-sample rules (ReLU, a 1x1 conv), as in MobileNetV1: the later
# one's parts run through a chain that reaches the earlier one. Zero-inserted gradients per sample: the later
# (out 4x4) 8 x 8 x 8 fp32 = 2 KiB, the earlier (out 8x8) 8 KiB; a limit of 4 KiB splits the later into [2, 1] and
# each of its parts again inside the earlier one.
TWO_DW_SHAPE, TWO_DW_SPLIT = (3, 16, 16), 2 * 8 * 8 * 8 * 4


@pytest.fixture(scope="module")
def two_strided_depthwise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return edgetl.prepare(net, "bias+mask", num_classes=4, input_shape=TWO_DW_SHAPE)


def _assert_carried_matches_eager(pm, split: int, shape) -> None:
    low = dataclasses.replace(CARRIED, zero_inserted_split_bytes=split)
    want, _ = _grads(pm, EAGER, shape)
    got, _ = _grads(pm, low, shape)
    _assert_same_grads(got, want)


def test_a_second_strided_depthwise_conv_inside_a_chain_joins_its_own_parts(two_strided_depthwise):
    """Inside the later conv's chain the earlier conv is given one part and returns a plain tensor (its own parts
    joined), so the rules after it get tensors, not `BatchParts`; exact against the eager step."""
    _assert_carried_matches_eager(two_strided_depthwise, TWO_DW_SPLIT, TWO_DW_SHAPE)


def test_executorch_step_with_two_strided_depthwise_convs_matches_torch(two_strided_depthwise, tmp_path,
                                                                          monkeypatch):
    ops = _executorch_steps_match_torch(two_strided_depthwise, TWO_DW_SPLIT, tmp_path, monkeypatch, TWO_DW_SHAPE)
    assert ops.get("aten::cat", 0) == 1, ops  # the earlier conv's two parts inside the later conv's part [2]


def test_a_strided_depthwise_conv1d_carries_its_parts_reshaped():
    """Conv1d runs the Conv2d rule on an (N, C, 1, L) view: its carried parts are reshaped back part by part."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 8, 3, 1, 1), nn.ReLU(), nn.Conv1d(8, 8, 3, 2, 1, groups=8), nn.ReLU(),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    pm = edgetl.prepare(net, "bias+mask", num_classes=4, input_shape=(2, 32))
    # zero-inserted gradient 8 x 32 fp32 per sample: parts of one sample
    _assert_carried_matches_eager(pm, 8 * 32 * 4, (2, 32))


class _WeightCopies(Tracker):
    """The most dequantized weight copies (`w:` holders) alive at once."""

    most = 0

    def hold(self, key, t, kind=""):
        super().hold(key, t, kind)
        self.most = max(self.most, sum(k.startswith("w:") for k in self.holders))


def test_a_chain_by_parts_releases_each_rules_weights_after_its_call(prepared, monkeypatch):
    """As outside a chain, a rule's frozen weights are dequantized for its call on one part and released after it,
    not held for the whole chain over all parts (the analytic replay then matches what the runtime does)."""
    import edgetl.memory as memory

    trackers = []
    monkeypatch.setattr(memory, "Tracker", lambda: trackers.append(_WeightCopies()) or trackers[-1])
    joined = prepared.memory(B, None, dataclasses.replace(CARRIED, batch_parts_carried=False))
    carried = prepared.memory(B, None, CARRIED)
    assert [t.most for t in trackers] == [1, 1]
    assert carried.analytic_peak_bytes <= joined.analytic_peak_bytes


def test_batch_parts_are_never_carried_with_a_pinned_schedule():
    with pytest.raises(ValueError, match="batch_parts_carried"):
        Lowering(batch_parts_carried=True, pin_schedule=True)
