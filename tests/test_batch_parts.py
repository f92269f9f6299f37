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


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand((B, 3, SIZE, SIZE), generator=g), torch.randint(0, 4, (B,), generator=g)


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


def _grads(pm, lowering: Lowering):
    from edgetl.step import LeanStep

    step = LeanStep(pm, OptimizerConfig.make("sgd", lr=0.1), lowering)
    x, y = _batch()
    with _BackwardConvBatches() as seen:
        grads = step.program.loss_and_grads(x, y, pm.initial_params())[2]
    return grads, seen


def test_carried_batch_parts_match_the_eager_step_with_no_cat(prepared):
    want, _ = _grads(prepared, EAGER)
    got, seen = _grads(prepared, CARRIED)
    assert set(got) == set(want)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-5, atol=1e-6), name
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
    assert seen.cats == 1 and all(torch.allclose(got[k], v, rtol=1e-5, atol=1e-6) for k, v in want.items())


def test_executorch_step_with_carried_parts_matches_torch(prepared, tmp_path, monkeypatch):
    """Exported with XNNPACK: no cat and no bool op on ExecuTorch's kernels (each part's slice of an int8 mask is
    dequantized and applied inside XNNPACK), and two steps match the torch lean step."""
    pytest.importorskip("executorch")
    from edgetl.exporters import executorch as et_exporter
    from edgetl.exporters import export
    from edgetl.runtime import Trainer
    from edgetl.runtime.data import normalize

    carried = dataclasses.replace(et_exporter.DELEGATED, zero_inserted_split_bytes=SPLIT)
    monkeypatch.setattr(et_exporter, "DELEGATED", carried)
    opt = OptimizerConfig.make("sgd", lr=0.1, momentum=0.9)
    bundle = export(prepared, "executorch", tmp_path / "b", opt, batch_size=B)
    ops = json.loads((bundle / "manifest.json").read_text())["executorch"]["train_step_ops"]["portable_op_kinds"]
    # (the loss's one `where`)
    assert not any(k in op for op in ops for k in ("cat", "gt", "lt", "logical", "bitwise")), ops
    assert ops.get("aten::where", 0) == 1, ops
    trainer = Trainer.load(bundle)
    x, y = _batch()
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
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-5, atol=1e-6), name
