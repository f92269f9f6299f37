"""The ort-training backend's state includes AdamW's moments and step (kept by ONNX Runtime
inside its CheckpointState): a resumed run, and a run rolled back after a divergence, continue
exactly as a run that was never interrupted."""
import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime import DivergenceError, Trainer
from edgetl.runtime.backends.ort_checkpoint import STEP

B = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("adamw", lr=0.01)
    return export(pm, "ort-training", tmp_path_factory.mktemp("ort_state") / "bundle", opt, batch_size=B)


@pytest.fixture(scope="module")
def digits():
    from edgetl.datasets import load_dataset

    ds = load_dataset("digits", input_size=28, channels=1)
    return ds.x_train[:64], ds.y_train[:64]  # 4 steps per epoch


def _params(t: Trainer) -> dict:
    s = t.backend.get_state()
    return {k: s[k] for k in t.bundle.trainable}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_state_holds_the_moments_and_step(bundle, digits):
    t = Trainer.load(bundle)
    fresh = t.backend.get_state()
    assert fresh[STEP] == 0 and len(fresh) == 3 * len(t.bundle.trainable) + 1  # params, 2 moments each, step
    t.fit(*digits, epochs=1)
    state = t.backend.get_state()
    assert state[STEP] == 4
    assert all(np.abs(v).max() > 0 for k, v in state.items() if ".ort.momentum" in k)


def test_resume_from_a_checkpoint_keeps_adamw(bundle, digits, tmp_path):
    ck = tmp_path / "ck.npz"
    Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck)
    resumed = Trainer.load(bundle)
    resumed.fit(*digits, epochs=3, checkpoint=ck)
    ref = Trainer.load(bundle)
    ref.fit(*digits, epochs=3)
    assert resumed.step == ref.step == 12
    assert _same(_params(resumed), _params(ref))


def test_divergence_rollback_keeps_adamw(bundle, digits):
    """A step whose new parameters are not finite is undone, moments and step included: the next
    step from there matches the one a run stopped before that step takes."""
    t = Trainer.load(bundle)
    real_step = t.backend.train_step

    def poisoning_step(x, y, lr):
        out = real_step(x, y, lr)
        if t.step == 5:  # the 6th step: ORT updated its moments, and its parameters are poisoned
            state = t.backend.get_state()
            first = t.bundle.trainable[0]
            t.backend.set_state({**state, first: np.full_like(state[first], np.inf)})
        return out

    t.backend.train_step = poisoning_step
    with pytest.raises(DivergenceError, match="step 6 diverged"):
        t.fit(*digits, epochs=3)
    assert t.step == 5
    ref = Trainer.load(bundle)  # the same run, stopped before its 6th step
    real_ref_step = ref._train_step

    def stop_at_5(x, y):
        if ref.step == 5:
            raise KeyboardInterrupt
        return real_ref_step(x, y)

    ref._train_step = stop_at_5
    with pytest.raises(KeyboardInterrupt):
        ref.fit(*digits, epochs=3)
    assert _same(_params(t), _params(ref))
    x, y = t._xy(digits[0][:B], digits[1][:B])
    for trainer in (t, ref):
        real = trainer.backend.train_step if trainer is ref else real_step
        real(x, y, 0.01)
    assert _same(_params(t), _params(ref))


def test_peer_runtime_is_profiled_in_the_peer_not_here(bundle):
    """Without training bindings here, ORT's runtime runs in the peer Python: profiling this
    process would measure the wrong one, so it is refused, and the device CLI in the peer does it."""
    import json
    import subprocess

    from edgetl.runtime import InputError
    from edgetl.runtime.backends.ort_peer import bindings_here, peer_command
    from edgetl.runtime.profile import profile_trainer

    if bindings_here():
        pytest.skip("ORT's training bindings are installed in this environment")
    with pytest.raises(InputError, match="another process"):
        profile_trainer(Trainer.load(bundle), steps=1)
    r = subprocess.run(peer_command("profile", str(bundle), "--steps", "2", "--json"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["target"] == "ort-training" and p["measured_peak_bytes"] > 0


def test_module_and_optimizer_are_released_before_their_checkpoint_state():
    """ORT's Module and Optimizer hold a bare pointer into their CheckpointState. Freed first (when
    `set_state` reopened them on a new state, and when the backend was collected), the state left them
    dangling: `free(): invalid next size (fast)` in 3 of 10 Lite0 224 `side` profile runs, 2 of 8 runs
    of steps + set_state, at exit. Checked with stand-ins recording the order they are released in."""
    import gc
    from pathlib import Path
    from types import SimpleNamespace

    from edgetl.runtime.backends.ort_training import OrtTrainingBackend

    released = []

    class State:
        def __init__(self, name):
            self.name = name

        def __del__(self):
            released.append(self.name)

    class User:  # a Module or an Optimizer of `state`
        def __init__(self, *args):
            self.of = next(a for a in args if isinstance(a, State)).name

        def __del__(self):
            released.append(f"user of {self.of}")

    backend = OrtTrainingBackend.__new__(OrtTrainingBackend)
    backend.bundle = SimpleNamespace(manifest={"programs": {"training": "t", "eval": "e", "optimizer": "o"}})
    backend.files, backend.device, backend.so = Path("."), None, None
    backend.C = SimpleNamespace(Module=User, Optimizer=User)
    backend._open(State("a"))
    backend._open(State("b"))  # as set_state does
    del backend
    gc.collect()
    assert released == ["user of a", "user of a", "a", "user of b", "user of b", "b"], released
