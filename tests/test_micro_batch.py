"""Micro-batches inside the exported step: k calls of a step that accumulates gradients equal one
full-batch step of the torch autograd reference, eagerly and in the exported onnx and executorch bundles."""
import dataclasses

import numpy as np
import pytest
import torch

import edgetl
from edgetl.errors import EdgeTLError
from edgetl.exporters import export
from edgetl.optim import OptimizerConfig
from edgetl.reference import reference_steps
from edgetl.runtime import Trainer, load_bundle
from edgetl.runtime.data import normalize
from helpers import param_err

B, M = 8, 2


@pytest.fixture(scope="module")
def pm():
    return edgetl.prepare("mnist_cnn", "bias+mask", num_classes=4, input_size=28)


def _batch(pm, n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, pm.in_channels, pm.input_size, pm.input_size, generator=g)
    return x, torch.randint(0, pm.num_classes, (n,), generator=g)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_micro_steps_equal_one_full_batch_step(pm, opt):
    extra = {"eps": 1e-6} if opt == "adamw" else {}
    cfg = OptimizerConfig.make(opt, lr=0.05 if opt == "sgd" else 1e-3, weight_decay=0.01, **extra)
    k = B // M
    step = pm.step_module(dataclasses.replace(cfg, accumulate=k))
    params = pm.initial_params()
    state = step.init_state(params)
    x, y = _batch(pm)
    for s in range(2):  # two optimizer steps: the second starts from accumulated optimizer state
        losses = []
        for i in range(k):
            before = {t: v.clone() for t, v in params.items()}
            loss, _, params, state, _ = step.run(x[i * M:(i + 1) * M], y[i * M:(i + 1) * M], cfg.lr, params, state)
            losses.append(float(loss))
            if i < k - 1:  # no update before the last micro-batch
                assert all(torch.equal(params[t], before[t]) for t in params)
        assert float(state["micro_step"]) == 0 and all(float(state[f"accum:{t}"].abs().max()) == 0 for t in params)
    ref = reference_steps(pm, x, y, cfg, steps=2)
    assert abs(np.mean(losses) - ref.losses[-1]) < 1e-5
    err = {t: param_err(params[t], ref.params[t]) for t in pm.trainable}
    assert max(err.values()) < 1e-4, max(err.items(), key=lambda kv: kv[1])


@pytest.fixture(scope="module")
def bundle(pm, tmp_path_factory):
    out = tmp_path_factory.mktemp("mb") / "bundle"
    return export(pm, "onnx", out, OptimizerConfig.make("sgd", lr=0.05), batch_size=B, micro_batch=M)


def test_exported_step_takes_micro_batches_and_fit_matches_full_batch(pm, bundle):
    b = load_bundle(bundle)
    assert b.batch_size == B and b.micro_batch == M
    assert b.manifest["optimizer"]["accumulate"] == B // M
    # the analytic memory is that of the micro-batch program (its input is M samples)
    assert b.manifest["analytic_memory"]["batch_size"] == M
    x, y = _batch(pm, 2 * B, seed=3)
    tr = Trainer.load(bundle)
    res = tr.fit(x.numpy(), y.numpy().astype(np.int64), epochs=1, seed=0)
    assert tr.step == 2 and len(res.losses) == 2  # one optimizer step per batch, not per micro-batch
    order = tr.batches(2 * B, seed=0, epoch=0)
    xn = torch.from_numpy(normalize(x.numpy(), b.manifest))  # what the trainer feeds its programs
    ref_losses, ref = _reference(pm, xn, y, order, OptimizerConfig.make("sgd", lr=0.05))
    assert np.allclose(res.losses, ref_losses, atol=1e-5), (res.losses, ref_losses)  # each the batch's mean
    got = tr.get_state()
    err = {t: param_err(torch.from_numpy(got[t]), ref[t]) for t in pm.trainable}
    assert max(err.values()) < 1e-4, max(err.items(), key=lambda kv: kv[1])


def test_executorch_bundle_takes_micro_batches_and_fit_matches_full_batch(pm, tmp_path):
    """The executorch step carries the accumulators as state inputs/outputs like the optimizer's own:
    B/M calls of the M-sample program equal one full-batch torch step (SGD momentum); eval keeps the
    bundle's static batch."""
    pytest.importorskip("executorch")
    cfg = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    out = export(pm, "executorch", tmp_path / "et", cfg, batch_size=B, micro_batch=M)
    b = load_bundle(out)
    assert (b.batch_size, b.micro_batch, b.manifest["optimizer"]["accumulate"]) == (B, M, B // M)
    tr = Trainer.load(out)
    assert [shape[0] for _, shape in tr.backend.train.inputs[:2]] == [M, M] and tr.backend.batch == B
    x, y = _batch(pm, 2 * B, seed=3)
    xn = normalize(x.numpy(), b.manifest)
    # one call of the program: accumulated, the parameters not yet moved
    before = tr.get_state()
    tr.backend.train_step(xn[:M], y.numpy()[:M], cfg.lr)
    after = tr.get_state()
    assert all(np.array_equal(after[t], before[t]) for t in b.trainable) and float(after["micro_step"]) == 1
    assert max(float(np.abs(after[f"accum:{t}"]).max()) for t in b.trainable) > 0
    tr.set_state(before)
    res = tr.fit(x.numpy(), y.numpy().astype(np.int64), epochs=1, seed=0)
    assert tr.step == 2 and len(res.losses) == 2
    order = tr.batches(2 * B, seed=0, epoch=0)
    ref_losses, ref = _reference(pm, torch.from_numpy(xn), y, order, cfg)
    assert np.allclose(res.losses, ref_losses, atol=1e-5), (res.losses, ref_losses)
    got = tr.get_state()
    assert float(got["micro_step"]) == 0
    err = {t: param_err(torch.from_numpy(got[t]), ref[t]) for t in pm.trainable}
    assert max(err.values()) < 1e-4, max(err.items(), key=lambda kv: kv[1])
    assert tr.evaluate(x.numpy()[:B + 3], y.numpy()[:B + 3].astype(np.int64))["n"] == B + 3  # eval: batch B, padded


def _reference(pm, x, y, order, cfg):
    """Full-batch torch steps over the batches `order`: (losses, final params)."""
    import torch.nn.functional as F
    from edgetl.reference import reference_logits

    leaves = {t: v.detach().clone().requires_grad_(True) for t, v in pm.initial_params().items()}
    opt = cfg.torch_optimizer(list(leaves.values()))
    losses = []
    for idx in order:
        opt.zero_grad()
        loss = F.cross_entropy(reference_logits(pm, x[idx], leaves), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {t: v.detach() for t, v in leaves.items()}


def test_micro_batch_refusals(pm, tmp_path, monkeypatch):
    with pytest.raises(EdgeTLError, match="does not divide batch_size"):
        export(pm, "onnx", tmp_path / "a", batch_size=8, micro_batch=3)
    with pytest.raises(EdgeTLError, match="micro_batch is for the onnx and executorch targets"):
        export(pm, "ort-training", tmp_path / "b", batch_size=8, micro_batch=2)
    # a rule with batch statistics (none of edgetl's has them: BatchNorm is folded or uses running stats)
    monkeypatch.setattr(type(pm.graph.nodes[0].rule), "mixes_batch", True)
    with pytest.raises(EdgeTLError, match="statistics over the batch"):
        export(pm, "onnx", tmp_path / "c", batch_size=8, micro_batch=2)
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("target", ["ort-training"])
def test_a_manifest_with_micro_batches_for_a_target_without_them_is_refused(bundle, target):
    """The targets' specs say which take `input.micro_batch` (onnx, executorch); the runtime refuses it
    elsewhere."""
    import json

    from edgetl.runtime.bundle import validate_manifest
    from edgetl.runtime.errors import BundleError

    m = json.loads((bundle / "manifest.json").read_text())
    validate_manifest(m)
    with pytest.raises(BundleError, match=f"a {target} bundle cannot take micro-batches"):
        validate_manifest({**m, "target": target})

