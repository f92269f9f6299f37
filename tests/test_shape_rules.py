"""Tensor plumbing (reshape, permute, slice, split, cat, squeeze, expand, mean, arithmetic with
constants, padding) traced from ordinary model code, each checked against torch autograd."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetl
from edgetl.optim import OptimizerConfig
from helpers import lean_vs_reference


def channel_shuffle(y):
    b, c, h, w = y.shape
    return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def shuffle_block(y):  # ShuffleNetV2: split, transform one half, concat, shuffle
    a, b = y.chunk(2, dim=1)
    return channel_shuffle(torch.cat([a, b * 0.5 + 1.0], 1))


BODIES = {
    "channel_shuffle": channel_shuffle,
    "shuffle_block": shuffle_block,
    "permute_layout": lambda y: y.permute(0, 2, 3, 1).relu().permute(0, 3, 1, 2),
    "channel_slices": lambda y: torch.cat([y[:, 5:], y[:, :5]], 1),
    "strided_slices": lambda y: y[:, :, 1::2, ::3] - y[:, :, :5:2, 1:7:2],
    "split_rows": lambda y: torch.cat(list(reversed(torch.split(y, [3, 4], 2))), 2),
    "cat_width": lambda y: torch.cat([y, y[:, :, :, :2]], 3),
    "unsqueeze_squeeze": lambda y: (y.unsqueeze(2) * 2.0).squeeze(2),
    "expand_gate": lambda y: y * y.mean((2, 3), keepdim=True).expand(-1, -1, 7, 7),
    "mean_one_dim": lambda y: y.mean(3, keepdim=True) + y,
    "scalar_arith": lambda y: (1.0 - y) / 3.0 + (y - 2) * 0.5,
    "pad_value": lambda y: F.pad(y, (1, 0, 2, 1), value=0.5),
    "sub_two_activations": lambda y: y - torch.relu(y),
    "select_channels": lambda y: torch.cat([torch.unsqueeze(y[:, i], 1) * (i + 1.0) for i in (7, 0, 3)] + [y[:, 3:]], 1),
    "reshape_rows": lambda y: y.reshape(y.size(0), 8, 49).relu().reshape(-1, 8, 7, 7),
}


class Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5, requires_grad=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.body(torch.relu(self.conv(x)) * self.scale)  # a frozen constant tensor of the model
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("recipe", ["full", "bias+mask"])
def test_structural_rule_matches_autograd(body, recipe):
    torch.manual_seed(0)
    model = Net(BODIES[body])
    pm = edgetl.prepare(model, recipe, num_classes=4, input_size=7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 7, 7, generator=g)
    gerr, perr = lean_vs_reference(pm, x, torch.tensor([0, 1, 3]), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < 1e-5


@pytest.mark.parametrize("body", list(BODIES))
def test_structural_graph_computes_the_model(body):
    from edgetl.program import Program
    from edgetl.trace import trace

    torch.manual_seed(0)
    model = Net(BODIES[body]).eval()
    graph = trace(model, (3, 7, 7))
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        got = Program(graph, lambda name, zero=None: graph.tensors[name]).forward(x, {}, train=False)[0]
        assert torch.allclose(got, model(x), atol=1e-5)


def test_batch_mixing_reshape_is_unsupported():
    from edgetl.errors import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match="batch"):
        edgetl.prepare(Net(lambda y: y.reshape(1, -1, 7, 7).reshape(y.shape)), "full", num_classes=4,
                       input_size=7)


def _all_plumbing(y):
    y = shuffle_block(y)
    y = y.permute(0, 2, 3, 1).relu().permute(0, 3, 1, 2)
    y = torch.cat([y[:, 5:], torch.unsqueeze(y[:, 0], 1), y[:, 1:5]], 1)
    y = F.pad(y, (1, 0, 2, 1), value=0.5)[:, :, 1::2, ::2]
    return y * y.mean((2, 3), keepdim=True).expand(-1, -1, y.shape[2], y.shape[3]) - 0.25


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_plumbing_exports_and_steps_on_the_runtime(tmp_path, target):
    """Every structural rule in one model: the exported step, run by the torch-free runtime,
    matches the torch step."""
    import numpy as np

    from edgetl.exporters import export
    from edgetl.runtime import Trainer
    from edgetl.runtime.data import normalize

    if target == "executorch":
        pytest.importorskip("executorch")
    torch.manual_seed(0)
    pm = edgetl.prepare(Net(_all_plumbing), "full", num_classes=4, input_size=7)
    opt = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    trainer = Trainer.load(export(pm, target, tmp_path / "b", opt, batch_size=3))
    g = np.random.default_rng(0)
    x, y = g.random((3, 3, 7, 7), dtype=np.float32), g.integers(0, 4, 3)
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    for _ in range(2):
        _, _, params, state, _ = step.run(torch.from_numpy(normalize(x, trainer.bundle.manifest)),
                                          torch.from_numpy(y), opt.lr, params, state)
        trainer._train_step(trainer._x(x), y.astype(np.int64))
    got = trainer.backend.get_state()
    for t in pm.trainable:
        ref = params[t].numpy()
        assert np.abs(got[t] - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), t
