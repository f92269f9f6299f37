"""Frozen int8 weights dequantized in row blocks (`Lowering.weight_block_bytes`): the step computes
the same as with whole weights, the analytic model counts one block at a time, and an onnx bundle
exported so trains torch-free like the torch step (issue 12, goal 4: the microcontroller row)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgetl
from edgetl.exporters import export, lowering
from edgetl.lowering import Lowering
from edgetl.optim import OptimizerConfig
from edgetl.step import LeanEval, LeanStep

KB = 1024
BLOCK = 16 * KB
FC = "fc_layers.0.weight"  # mnist_cnn's (256, 1152) frozen fc weight: 1152 KB as fp32


@pytest.fixture(scope="module")
def pm():
    return edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10, input_size=28)


def _batch(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("recipe", ["bias+mask", "side+mask"])
def test_blocked_step_matches_whole_weights(recipe):
    pm = edgetl.prepare("mnist_cnn", recipe, num_classes=10, input_size=28)
    opt = OptimizerConfig.make("sgd", lr=0.1, momentum=0.9)
    x, y = _batch()
    params = pm.initial_params()
    state = opt.init_state(params)
    blocked = LeanStep(pm, opt, Lowering(weight_block_bytes=BLOCK))
    # the large frozen weights are stored and read by rows; the step's stored bytes are unchanged
    assert set(blocked.store.block_slots) >= {"conv_layers.6.weight", FC}
    assert len(blocked.store.block_slots[FC]) == -(-256 // (BLOCK // (1152 * 4)))
    whole_bytes = sum(b.nbytes for b in LeanStep(pm, opt).store.buffers())
    assert sum(b.nbytes for b in blocked.store.buffers()) == whole_bytes
    a = LeanStep(pm, opt).run(x, y, 0.1, params, state)
    b = blocked.run(x, y, 0.1, params, state)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-6)  # loss
    torch.testing.assert_close(b[1], a[1], rtol=1e-6, atol=1e-6)  # logits
    for t in pm.trainable:
        torch.testing.assert_close(b[4][t], a[4][t], rtol=1e-5, atol=1e-6)  # gradients: summation order only
    p = [params[t] for t in pm.trainable]
    torch.testing.assert_close(LeanEval(pm, Lowering(weight_block_bytes=BLOCK))(x, *p), LeanEval(pm)(x, *p),
                               rtol=1e-6, atol=1e-6)


def test_analytic_model_counts_one_block_at_a_time(pm):
    whole = pm.memory(1, None, lowering("executorch"))
    blocked = pm.memory(1, None, lowering("executorch", BLOCK))
    assert whole.peak_by_kind["weights (dequantized, transient)"] == 256 * 1152 * 4  # the fc weight as fp32
    assert blocked.peak_by_kind.get("weights (dequantized, transient)", 0) <= BLOCK
    assert blocked.frozen_weights_bytes == whole.frozen_weights_bytes  # int8 as stored, in flash
    assert blocked.analytic_peak_bytes < whole.analytic_peak_bytes - 800 * KB


@pytest.mark.slow
def test_blocked_onnx_bundle_trains_torch_free_like_the_torch_step(pm, tmp_path):
    opt = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    bundle = export(pm, "onnx", tmp_path / "b", opt, batch_size=2, weight_block_bytes=BLOCK)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["lowering"] == {"weight_block_bytes": BLOCK}
    assert manifest["analytic_memory"]["analytic_peak_bytes"] == pm.memory(2, opt, lowering("onnx", BLOCK)) \
        .analytic_peak_bytes
    import onnx

    graph = onnx.load(bundle / "train_step.onnx").graph
    # one int8 initializer per block of the fc weight, each dequantized on its own
    fc_rows = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and list(i.dims[1:]) == [1152]]
    assert len(fc_rows) == -(-256 // (BLOCK // (1152 * 4))) and all(i.dims[0] <= 3 for i in fc_rows)
    g = np.random.default_rng(0)
    batches = [(g.random((2, 1, 28, 28), dtype=np.float32), g.integers(0, 10, 2)) for _ in range(3)]
    data = tmp_path / "batches.npz"
    np.savez(data, x=np.stack([b[0] for b in batches]), y=np.stack([b[1] for b in batches]))
    code = (
        "from edgetl.runtime.notorch import block_torch; block_torch()\n"
        "import sys, numpy as np\n"
        "from edgetl.runtime import Trainer\n"
        f"z = np.load({str(data)!r}); t = Trainer.load({str(bundle)!r})\n"
        "for x, y in zip(z['x'], z['y']):\n    t._train_step(t._x(x), y.astype(np.int64))\n"
        f"np.savez({str(tmp_path / 'got.npz')!r}, **t.backend.get_state())\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "got.npz")
    step = pm.step_module(opt)  # the eager torch step, whole weights
    params = pm.initial_params()
    state = step.init_state(params)
    mean, std = pm.mean[0], pm.std[0]
    for x, y in batches:
        _, _, params, state, _ = step.run(torch.from_numpy((x - mean) / std), torch.from_numpy(y), opt.lr,
                                          params, state)
    for t in pm.trainable:
        ref = params[t].numpy()
        assert np.abs(got[t] - ref).max() <= 1e-4 * (np.abs(ref).max() + 1e-12), t
