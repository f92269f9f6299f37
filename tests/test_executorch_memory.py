"""The `executorch` target's memory plan follows the lean step: `mask` makes it smaller.

A small ReLU6 CNN (the activation of MobileNet/EfficientNet-Lite) is exported for `bias` (each
ReLU6 keeps its float output) and `bias+mask` (a bool mask). XNNPACK would otherwise fuse the
whole forward into one delegate call whose outputs are all the activations the masks are made
from, alive at once, and re-sort the graph breadth-first: both recipes then get the same plan."""
import json

import numpy as np
import pytest
import torch.nn as nn

pytest.importorskip("executorch")

import edgetl  # noqa: E402
from edgetl.exporters import export  # noqa: E402
from edgetl.optim import OptimizerConfig  # noqa: E402

B, SIZE = 8, 32


def _relu6_cnn() -> nn.Module:
    def block(cin, cout, groups=1):
        return [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

    return nn.Sequential(*block(3, 16), *block(16, 16, groups=16), *block(16, 32), *block(32, 32, groups=32),
                         *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("etmem")
    out = {}
    for recipe in ("bias", "bias+mask"):
        pm = edgetl.prepare(_relu6_cnn(), recipe, num_classes=10, input_shape=(3, SIZE, SIZE))
        bundle = export(pm, "executorch", root / recipe.replace("+", "_"), OptimizerConfig.make("sgd", lr=0.05),
                        batch_size=B)
        out[recipe] = (pm, json.loads((bundle / "manifest.json").read_text()), bundle)
    return out


@pytest.mark.slow
def test_masks_shrink_the_executorch_plan(planned):
    """Each ReLU6 keeps 1 byte per element instead of 4. Measured plans (bias+mask / bias): 3.41 /
    6.30 MB (0.54×); without cutting the delegates 5.77 / 6.30 MB (0.92×); without restoring the
    written order 3.41 / 4.46 MB (0.76×: the hoisted comparisons give `bias` masks too)."""
    bias = planned["bias"][1]["executorch"]["planned_bytes"]
    masked = planned["bias+mask"][1]["executorch"]["planned_bytes"]
    assert masked < 0.65 * bias, (masked, bias)


def _train(bundle, lean: bool):
    from edgetl.runtime import Trainer

    t = Trainer.load(bundle, release_program=lean, share_weights=lean)
    rng = np.random.default_rng(0)
    x = rng.random((3 * B, 3, SIZE, SIZE), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    t.fit(x, y, epochs=2, seed=0)
    return t, t.get_state(), t.backend.logits(t._x(x))


@pytest.mark.slow
def test_released_program_pages_are_not_read_again(planned):
    """After loading, the backend hands back the pages of each program that ExecuTorch has freed,
    above all the fp32 frozen weights (restored from int8) once XNNPACK has packed them, and the
    eval program reuses the train step's packed weights (XNNPACK's weight cache). Were a released
    page still read, it would read zeros: training and evaluation must match a load that keeps the
    whole program and packs its own weights, bit for bit, and the release must cover the frozen
    weights."""
    from edgetl.runtime.backends.executorch_q8 import _header

    bundle = planned["bias+mask"][2]
    released, state, logits = _train(bundle, True)
    kept, state_k, logits_k = _train(bundle, False)
    assert kept.backend.train.released_bytes == 0
    for name in state_k:
        assert np.array_equal(state[name], state_k[name]), name
    assert np.array_equal(logits, logits_k)
    for method, file in ((released.backend.train, "train_step.pte"), (released.backend.eval, "eval.pte")):
        blobs = [b[1] for b in _header((bundle / file).read_bytes())[0]["blobs"]]  # the fp32 frozen weights
        # whole pages only: up to one page lost at each end of each blob
        assert blobs and method.released_bytes >= sum(blobs) - 2 * 4096 * len(blobs), (file, method.released_bytes)


@pytest.mark.slow
def test_profile_models_the_executorch_step_by_its_plan(planned):
    """`profile`'s analytic step memory for an executorch bundle is the plan its exporter recorded,
    and the measured step (the arena plus whatever the step allocates above the level before it)
    stays within 15% of it: nothing sizeable runs outside the plan."""
    import subprocess
    import sys

    bundle, manifest = planned["bias+mask"][2], planned["bias+mask"][1]
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "3", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["analytic_step_bytes"] == manifest["executorch"]["planned_bytes"] > 3 * 2**20
    assert 0.85 <= out["measured_vs_analytic"] <= 1.15, (out["measured_peak_bytes"], out["analytic_step_bytes"])
