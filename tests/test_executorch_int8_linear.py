"""`Lowering.int8_pointwise_linear`: the ExecuTorch step's frozen 1x1 convs run as XNNPACK linears with int8 weights.

XNNPACK packs a conv's constant weight as fp32; its f32_qc8w fully connected (fp32 activations, per-channel
int8 weight) keeps 1 byte per weight. A small MobileNet-like CNN (`bias+mask`) is exported once: its steps
and eval logits match the eager lean step, the dequantize and the linear run inside XNNPACK, and the eval
program holds the pointwise weights as int8."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("executorch")

import edgetl  # noqa: E402
from edgetl.exporters import export  # noqa: E402
from edgetl.optim import OptimizerConfig  # noqa: E402
from edgetl.runtime import Trainer  # noqa: E402
from edgetl.runtime.data import normalize  # noqa: E402

B, SIZE, WIDE = 4, 8, 128  # every 1x1 conv here has H x W <= 4 x its input channels
OPT = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)


def _pointwise_cnn() -> nn.Module:
    def block(cin, cout, k=1, groups=1):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

    torch.manual_seed(0)
    return nn.Sequential(*block(3, 16, 3), *block(16, WIDE), *block(WIDE, WIDE, 3, WIDE), *block(WIDE, WIDE),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDE, 10)).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare(_pointwise_cnn(), "bias+mask", num_classes=10, input_shape=(3, SIZE, SIZE))
    return pm, export(pm, "executorch", tmp_path_factory.mktemp("etq8w") / "b", OPT, batch_size=B)


def _batches(n: int):
    g = np.random.default_rng(0)
    return [(g.random((B, 3, SIZE, SIZE), dtype=np.float32), g.integers(0, 10, B).astype(np.int64)) for _ in range(n)]


def test_steps_match_the_torch_lean_step(bundle):
    pm, out = bundle
    t = Trainer.load(out)
    step = pm.step_module(OPT)
    params = pm.initial_params()
    state = step.init_state(params)
    for x, y in _batches(3):
        xn = normalize(x, t.bundle.manifest)
        t.backend.train_step(xn, y, OPT.lr)
        _, _, params, state, _ = step.run(torch.from_numpy(xn), torch.from_numpy(y), OPT.lr, params, state)
    got, ref = t.backend.get_state(), {**params, **state}
    bad = {k: float(np.abs(got[k] - ref[k].numpy()).max()) for k in ref
           if np.abs(got[k] - ref[k].numpy()).max() > 1e-4 * max(1.0, float(np.abs(ref[k].numpy()).max()))}
    assert not bad, bad


def test_pointwise_weights_are_int8_inside_xnnpack(bundle):
    """No dequantize or conv is left to ExecuTorch's kernels (a pointwise linear XNNPACK refused would leave the
    dequantize and an mm there; the trainable head's mm is there either way), and the eval program (the forward alone)
    holds each frozen pointwise weight in 1 byte, not 4 (the step reads them so in its backward too)."""
    from edgetl.runtime.backends.executorch_q8 import unpack

    pm, out = bundle
    et = json.loads((out / "manifest.json").read_text())["executorch"]
    for ops in (et["eval_ops"], et["train_step_ops"]):
        left = set(ops["portable_op_kinds"])
        assert not left & {"aten::linear", "aten::convolution", "quantized_decomposed::dequantize_per_channel"}
    shapes = [tuple(pm.frozen(t).shape) for t in pm.stored]
    pointwise = sum(int(np.prod(s)) for s in shapes if len(s) == 4 and s[2:] == (1, 1) and s[1] > 1)
    others = sum(int(np.prod(s)) for s in shapes) - pointwise
    assert pointwise > 2 * others  # the check below tells 1 byte from 4 per pointwise weight
    program = len(unpack((out / "eval.pte").read_bytes()))
    assert program < 4 * others + 2 * pointwise + 16_000  # 1 byte: ~1 + 6 kB of program; 4 bytes: ~3 + 6 kB
