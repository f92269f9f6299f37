"""The `executorch` target: export (XNNPACK-delegated lean step) and the torch-free backend.

Two small bundles (mnist_cnn 28×28, batch 8) are exported once per module: bias+mask with AdamW
and side+mask with SGD+momentum. Steps go through the backend's train_step on normalized input,
as the Trainer does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

import edgetl  # noqa: E402
from edgetl.exporters import export  # noqa: E402
from edgetl.optim import OptimizerConfig  # noqa: E402
from edgetl.runtime import InputError, Trainer  # noqa: E402
from edgetl.runtime.data import normalize  # noqa: E402
from edgetl.step import LeanEval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

B = 8
RECIPES = {
    "bias+mask": OptimizerConfig.make("adamw", lr=1e-2, weight_decay=0.01),
    "side+mask": OptimizerConfig.make("sgd", lr=0.05, momentum=0.9),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("et")
    out = {}
    for recipe, opt in RECIPES.items():
        pm = edgetl.prepare("mnist_cnn", recipe, num_classes=10, input_size=28)
        out[recipe] = (pm, opt, export(pm, "executorch", root / recipe.replace("+", "_"), opt, batch_size=B))
    return out


def _batches(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    return [(g.random((B, 1, 28, 28), dtype=np.float32), g.integers(0, 10, B).astype(np.int64)) for _ in range(n)]


def _torch_steps(pm, opt, manifest, batches):
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    for x, y in batches:
        xt = torch.from_numpy(normalize(x, manifest))
        _, _, params, state, _ = step.run(xt, torch.from_numpy(y), opt.lr, params, state)
    return {**params, **state}


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> bool:
    return float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


def test_manifest_records_the_design(bundles):
    _, _, out = bundles["bias+mask"]
    m = json.loads((out / "manifest.json").read_text())
    et = m["executorch"]
    assert m["programs"] == {"train_step": "train_step.pte", "eval": "eval.pte"}
    assert et["delegate"] == "xnnpack"
    assert et["frozen_weights_in_program"].startswith("fp32")
    assert et["planned_bytes"] > 0
    assert et["train_step_ops"]["delegate_calls"] > 0
    assert Trainer.load(out).backend.planned_bytes() == et["planned_bytes"]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_five_steps_match_the_torch_lean_step(bundles, recipe):
    pm, opt, out = bundles[recipe]
    batches = _batches(5)
    t = Trainer.load(out)
    for x, y in batches:
        loss, logits = t.backend.train_step(normalize(x, t.bundle.manifest), y, opt.lr)
        assert np.isfinite(loss) and logits.shape == (B, 10)
    ref = _torch_steps(pm, opt, t.bundle.manifest, batches)
    got = t.backend.get_state()
    assert set(got) == set(ref)
    bad = {k: float(np.abs(got[k] - ref[k].numpy()).max()) for k in got if not _close(got[k], ref[k].numpy())}
    assert not bad, bad


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_trainable_tensor_changes(bundles, recipe):
    """Guards against a delegate baking a trainable tensor (XNNPACK folds conv biases)."""
    pm, opt, out = bundles[recipe]
    t = Trainer.load(out)
    before = t.backend.get_state()
    (x, y), = _batches(1, seed=1)
    t.backend.train_step(normalize(x, t.bundle.manifest), y, opt.lr)
    after = t.backend.get_state()
    frozen = [n for n in pm.trainable if np.array_equal(before[n], after[n])]
    assert not frozen, f"trainable tensors that did not change: {frozen}"
    ref = _torch_steps(pm, opt, t.bundle.manifest, [(x, y)])
    for n in pm.trainable:
        assert _close(after[n], ref[n].numpy()), n


def test_eval_logits_match_lean_eval(bundles):
    pm, opt, out = bundles["bias+mask"]
    t = Trainer.load(out)
    (x, y), = _batches(1, seed=2)
    t.backend.train_step(normalize(x, t.bundle.manifest), y, opt.lr)
    params = t.backend.get_state()
    xs = np.random.default_rng(3).random((2 * B + 3, 1, 28, 28), dtype=np.float32)  # pads the last chunk
    got = t.predict_logits(xs)
    ev = LeanEval(pm).eval()
    with torch.no_grad():
        ref = ev(torch.from_numpy(normalize(xs, t.bundle.manifest)),
                 *(torch.from_numpy(params[n]) for n in pm.trainable)).numpy()
    assert got.shape == ref.shape == (2 * B + 3, 10)
    assert _close(got, ref), float(np.abs(got - ref).max())


def test_each_frozen_weight_is_packed_one_way(bundles, capfd):
    """ExecuTorch's XNNPACK weight cache names a packed weight by its constant alone. mnist_cnn's frozen fc weight
    was packed for the forward and, transposed, for the input gradient g @ W: the eval program's forward then
    found the transposed packing under the name, packed the weight a third time, and closing the programs logged
    `delete_packed_data: '...' not found` (`Lowering.linear_input_grad_own_weight`)."""
    import gc

    pm, opt, out = bundles["bias+mask"]
    t = Trainer.load(out)
    (x, y), = _batches(1, seed=4)
    t.backend.train_step(normalize(x, t.bundle.manifest), y, opt.lr)
    t.predict_logits(x)
    del t
    gc.collect()
    err = capfd.readouterr().err
    assert "seed mismatch" not in err and "delete_packed_data" not in err, err[-2000:]


def test_torch_free_process_fits_and_exports(bundles, tmp_path):
    _, _, out = bundles["side+mask"]
    code = (
        "from edgetl.runtime.notorch import block_torch; block_torch()\n"
        "import json, sys, numpy as np\n"
        "from edgetl.runtime import Trainer\n"
        "g = np.random.default_rng(0)\n"
        f"x = g.random((3 * {B}, 1, 28, 28), dtype=np.float32); y = g.integers(0, 10, 3 * {B})\n"
        f"t = Trainer.load({str(out)!r})\n"
        "r = t.fit(x, y, epochs=2)\n"
        "acc = t.evaluate(x, y)['accuracy']\n"
        f"files = t.export_inference({str(tmp_path / 'model.pte')!r})\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
        "print(json.dumps({'steps': r.steps, 'losses': r.losses, 'acc': acc, 'files': [str(f) for f in files]}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 6
    losses = res["losses"]
    assert all(np.isfinite(losses)) and sum(losses[3:]) < sum(losses[:3])  # epoch 2 beats epoch 1
    names = sorted(p.rsplit("/", 1)[-1] for p in res["files"])
    assert names == ["model.json", "model.npz", "model.pte"]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["inputs"][0] == "x" and meta["static_batch"] == B


def test_native_runner_reports_planned_memory(bundles):
    """The runtime's own plan for the step equals what the exporter recorded."""
    _, _, out = bundles["side+mask"]
    t = Trainer.load(out)
    assert t.backend.train.planned_bytes == t.bundle.manifest["executorch"]["planned_bytes"]


@pytest.mark.parametrize("threads", [1, 2])
def test_edgetl_threads_sizes_the_executorch_pool(bundles, threads):
    """EDGETL_THREADS sets ExecuTorch's thread pool (XNNPACK's delegates and the optimized kernels):
    at 1 the step runs on the calling thread alone, so no pool thread spins on another core and a
    step's CPU time is one thread's work; at 2 the pool has one worker thread. Counted in a fresh
    process: the pool size the runtime reports and the threads the process gains while stepping."""
    _, opt, out = bundles["bias+mask"]
    code = (
        "import os, json, numpy as np\n"
        "from edgetl.runtime import Trainer\n"
        "from edgetl.runtime.backends.executorch import pool_threads\n"
        "tasks = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = tasks()\n"
        f"t = Trainer.load({str(out)!r})\n"
        "g = np.random.default_rng(0)\n"
        f"x = g.standard_normal(({B}, 1, 28, 28)).astype(np.float32); y = g.integers(0, 10, {B})\n"
        f"for _ in range(2): t.backend.train_step(x, y, {opt.lr})\n"
        "print(json.dumps({'pool': pool_threads(), 'gained': tasks() - before}))\n"
    )
    env = {**os.environ, "EDGETL_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"pool": threads, "gained": threads - 1}


def test_timed_step_returns_the_step_and_one_time_per_instruction(bundles):
    """`timed` (bench/et_step_profile.py) runs the step one instruction at a time: the same outputs as a
    plain call, and a CPU time for each instruction the program has, no more."""
    sys.path.insert(0, str(ROOT / "bench"))
    from et_step_profile import instructions

    t = Trainer.load(bundles["side+mask"][2])
    (x, y), = _batches(1)
    inputs = [normalize(x, t.bundle.manifest), y, np.float32(0.05), *t.backend.params, *t.backend.state]
    outs, ms = t.backend.train.timed(inputs)
    for a, b in zip(outs, t.backend.train(inputs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(ms) == len(instructions(t.bundle.program_bytes("train_step")))
    assert ms.dtype == np.float64 and (ms >= 0).all() and ms.sum() > 0


def test_the_pool_is_not_resized_under_a_loaded_program(bundles):
    """A resize replaces ExecuTorch's pool, which the loaded program's XNNPACK runtimes still use:
    refused with a clear error while one is loaded; the size it has stays."""
    from edgetl.runtime import EdgeRuntimeError
    from edgetl.runtime.backends.executorch import pool_threads

    t = Trainer.load(bundles["side+mask"][2])
    n = pool_threads()
    with pytest.raises(EdgeRuntimeError, match="cannot change"):
        pool_threads(n + 1)
    assert pool_threads() == pool_threads(n) == n
    del t


def test_checkpoint_roundtrip_keeps_zero_dim_state(bundles, tmp_path):
    """AdamW's `step` is 0-d: it must stay 0-d through get_state/set_state and a checkpoint."""
    _, opt, out = bundles["bias+mask"]
    t = Trainer.load(out)
    (x, y), = _batches(1, seed=4)
    t.backend.train_step(normalize(x, t.bundle.manifest), y, opt.lr)
    t.save_checkpoint(tmp_path / "ck.npz")
    u = Trainer.load(out)
    u.load_checkpoint(tmp_path / "ck.npz")
    a, b = t.backend.get_state(), u.backend.get_state()
    assert a["step"].shape == () and float(a["step"]) == 1.0
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lie", ["num_classes", "batch_size", "input", "trainable"])
def test_manifest_must_match_the_programs(bundles, tmp_path, lie):
    """A manifest resealed to lie about the programs is refused at load (issue 14, item 7)."""
    import shutil

    from edgetl.runtime import BundleError
    from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest

    d = tmp_path / "b"
    shutil.copytree(bundles["bias+mask"][2], d)
    m = json.loads((d / "manifest.json").read_text())
    if lie == "num_classes":  # the case: trained at loss 0, then crashed
        m["num_classes"] = 20
    elif lie == "batch_size":
        m["input"]["batch_size"] = B * 2
    elif lie == "input":
        m["input"]["shape"] = [1, 32, 32]
    else:  # two same-sized parameters' shapes told transposed
        m["trainable"][-1]["shape"] = m["trainable"][-1]["shape"][::-1] + [1]
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as info:
        Trainer.load(d)
    assert "manifest" in str(info.value) and "\n" not in str(info.value)


def test_export_inference_sidecars_never_overwrite_other_files(bundles, tmp_path):
    """The .npz and .json written beside the .pte are not named by the user: a data file of the
    same stem, a link into the bundle, or a sidecar name given as --out are refused, untouched."""
    _, _, out = bundles["side+mask"]
    t = Trainer.load(out)
    data = tmp_path / "digits.npz"
    data.write_bytes(b"the user's data")
    (tmp_path / "s.npz").symlink_to(out / "state.safetensors")
    state = (out / "state.safetensors").read_bytes()
    for target, words in [(tmp_path / "digits.pte", "would overwrite"), (tmp_path / "s.pte", "would overwrite"),
                          (tmp_path / "m.npz", "sidecar"), (tmp_path / "m.json", "sidecar")]:
        with pytest.raises(InputError, match=words):
            t.export_inference(target)
    assert data.read_bytes() == b"the user's data" and (out / "state.safetensors").read_bytes() == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npz", "s.npz"]
    for _ in range(2):  # an earlier export's own sidecars are replaced
        assert [p.name for p in t.export_inference(tmp_path / "model.pte")] == ["model.pte", "model.npz", "model.json"]
    Trainer.load(out)


def test_a_program_replaced_after_load_is_never_run(bundles):
    """A .pte swapped after the bundle's checksums were checked (a writer racing the runtime) is
    refused when the runtime opens it: it runs the checked bytes only."""
    import shutil

    from edgetl.runtime import BundleError, load_bundle
    from edgetl.runtime.backends import make_backend

    _, _, src = bundles["side+mask"]
    d = src.parent / "swapped"
    shutil.copytree(src, d)
    b = load_bundle(d)
    with open(d / b.manifest["programs"]["eval"], "ab") as f:  # still a program ExecuTorch runs as before
        f.write(b"\0" * 64)
    with pytest.raises(BundleError, match="sha256"):
        make_backend(b)
    shutil.rmtree(d)


def test_frozen_weights_are_stored_int8(bundles):
    """XNNPACK needs fp32 constant conv weights, but the bundle stores them as int8 + per-channel
    scales: each file is ≤ 0.35× the fp32 program it restores to, byte for byte. The fc weight the
    step reads as int8 (`Lowering.int8_frozen_linear`) is int8 in the program too (the train step's
    twice: as stored and transposed)."""
    from edgetl.exporters.executorch import DELEGATED
    from edgetl.runtime.backends.executorch_q8 import is_packed, unpack

    pm, _, out = bundles["bias+mask"]
    sizes = json.loads((out / "manifest.json").read_text())["executorch"]["program_bytes"]
    int8 = DELEGATED.int8_linear_weights(pm.graph)
    assert int8  # mnist_cnn's frozen fc weight
    int8_bytes = sum(pm.frozen(t).numel() for t in int8)
    fp32_frozen = 4 * sum(pm.frozen(t).numel() for t in pm.stored if t not in int8)
    for name in ("train_step.pte", "eval.pte"):
        data = (out / name).read_bytes()
        assert is_packed(data) and len(data) == sizes[name]["file"]
        program = unpack(data)
        assert len(program) == sizes[name]["program"] >= fp32_frozen + int8_bytes  # the convs' as fp32
        assert len(program) < fp32_frozen + 3 * int8_bytes + 300_000  # the fc's not as fp32 (4 x 295k)
        assert len(data) <= 0.35 * (len(program) - 2 * int8_bytes) + 2 * int8_bytes


def test_a_corrupted_int8_weight_is_refused(bundles):
    """One int8 weight changed in the file: the restored program fails its sha256 and is not run."""
    from edgetl.runtime import EdgeRuntimeError
    from edgetl.runtime.backends.executorch import NativeMethod
    from edgetl.runtime.backends.executorch_q8 import MAGIC

    _, _, out = bundles["side+mask"]
    data = bytearray((out / "eval.pte").read_bytes())
    hlen = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    header = json.loads(data[len(MAGIC) + 8 : len(MAGIC) + 8 + hlen])
    _, _, _, c, _ = header["blobs"][0]
    at = len(MAGIC) + 8 + hlen + 4 * c  # the first blob's first int8 value, after its scales
    data[at] = (data[at] + 1) % 256
    with pytest.raises(EdgeRuntimeError, match="sha256"):
        NativeMethod(bytes(data))


def test_masks_as_int8_are_exact_at_their_bounds():
    """ExecuTorch's masks are made by float ops XNNPACK runs, kept int8 and applied by a multiply
    (`masks_as_int8`: its bool kernels were 60% of Lite0's step). Equal to torch's `where` bit for
    bit at and around the bounds (0, -0, 6, the floats next to them, the smallest normal floats),
    for a mask kept across other work (int8) and one applied where it is made (float), and no bool
    op is left. (XNNPACK flushes denormals to zero, here as in the activations it computes itself.)"""
    import torch.nn.functional as F

    from edgetl.exporters import executorch as ex
    from edgetl.runtime.backends.executorch import NativeMethod

    class Masked(torch.nn.Module):
        def forward(self, x, g):
            y = F.relu6(x)
            kept = (y > 0) & (y < 6)
            h = F.relu6(g * 2.0)  # other work between the mask and its use: the mask is kept
            return torch.where(kept, h, 0.0), torch.where((x > -3) & (x < 3), g, 0.0), torch.where(x > 0, g, 0.0)

    edge = [0.0, -0.0, 6.0, 3.0, -3.0, 1.2e-38, -1.2e-38, 1e-37, float(np.nextafter(np.float32(6), 0)),
            float(np.nextafter(np.float32(6), 7)), float(np.nextafter(np.float32(3), 0)),
            float(np.nextafter(np.float32(-3), 0)), float(np.nextafter(np.float32(-3), -4)), 1e30, -1e30]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * 4 + 2
    x.reshape(-1)[: len(edge)] = edge
    g = rng.standard_normal(x.shape).astype(np.float32)
    args = (torch.from_numpy(x), torch.from_numpy(g))
    et = ex._lower(Masked(), args, delegate=True)
    kinds = ex._delegated_ops(et)["portable_op_kinds"]
    assert not {"aten::where", "aten::gt", "aten::lt", "aten::bitwise_and"} & set(kinds), kinds
    got = NativeMethod(et.buffer)([x, g])
    for a, b in zip(got, Masked()(*args)):  # (a masked-out element may be -0.0 where torch has 0.0)
        assert np.array_equal(a, b.numpy())
