"""The onnx exporter's graph rewrites: TF-same (asymmetric) padding runs as the Conv's own pads, no Pad copy."""
import numpy as np
import onnx
import torch
from torch import nn

import edgetl
from edgetl.exporters import export
from edgetl.runtime import Trainer


def _tf_same_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.ReLU6(),  # TF "same", stride 2
        nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    net.input_shape = (3, 16, 16)
    return net.eval()


def test_asymmetric_pads_fold_into_conv_and_the_step_still_matches_torch(tmp_path):
    pm = edgetl.prepare(_tf_same_net(), "bias+mask", num_classes=4, input_shape=(3, 16, 16))
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.0)
    bundle = export(pm, "onnx", tmp_path / "b", opt, batch_size=4)
    for program in ("train_step", "eval"):
        g = onnx.load(bundle / f"{program}.onnx").graph
        assert not [n.name for n in g.node if n.op_type == "Pad"], program
        pads = [list(a.ints) for n in g.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
        assert [0, 0, 1, 1] in pads and [1, 1, 2, 2] in pads, (program, pads)

    rng = np.random.default_rng(0)
    batches = [(rng.random((4, 3, 16, 16), dtype=np.float32), rng.integers(0, 4, 4)) for _ in range(3)]
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    t = Trainer.load(bundle)
    for x, y in batches:
        _, _, params, state, _ = step.run(torch.from_numpy(t._x(x)), torch.from_numpy(y), opt.lr, params, state)
        t._train_step(t._x(x), y.astype(np.int64))
    got = t.backend.get_state()
    for name in pm.trainable:
        ref = params[name].numpy()
        assert np.abs(got[name] - ref).max() <= 1e-4 * (np.abs(ref).max() + 1e-12), name
