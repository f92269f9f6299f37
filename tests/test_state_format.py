"""State and checkpoints in safetensors (issue 10, item 2): the bundle's initial state and the
checkpoints are read back exactly, earlier runtimes' npz files are still read, and a file that is
truncated, declares more than it holds, disagrees with the bundle or fails its checksum is refused
with one clear message before any array is made. Also the Trainer's per-batch API (item 5)."""
import json
import struct

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime import BundleError, CheckpointError, DivergenceError, InputError, Trainer
from edgetl.runtime import checkpoint as ckpt
from edgetl.runtime import safetensors as st
from edgetl.runtime import state as state_file
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256

B = 16
LR = 0.05


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+head", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=LR, momentum=0.9)
    return export(pm, "onnx", tmp_path_factory.mktemp("state") / "bundle", opt, batch_size=B)


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- the safetensors reader and writer ---------------------------------------------------------
def test_safetensors_round_trip_and_layout():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
              "h": np.array([1.5, -2], np.float16), "e": np.zeros((0, 4), np.float64)}
    data = st.encode(arrays, {"k": "v"})
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0 and data[8:9] == b"{"
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"] == {"k": "v"}
    assert header["w"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert data[8 + n : 8 + n + 24] == arrays["w"].astype("<f4").tobytes()  # raw little-endian bytes
    back, meta = st.decode(data)
    assert meta == {"k": "v"} and _same(back, arrays)
    assert all(back[k].dtype == arrays[k].dtype and back[k].flags.writeable for k in arrays)


def _header(entries: dict, data: bytes = b"") -> bytes:
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text + data


REFUSED = [
    (b"", "is truncated"),
    (b"\x05\x00\x00", "is truncated"),
    (struct.pack("<Q", 100) + b"{}", "beyond the file's 10 bytes"),
    (struct.pack("<Q", 1 << 40) + b"{}", "more than the"),
    (struct.pack("<Q", 3) + b"{x}", "not JSON"),
    (_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "declares 16 bytes"),
    (_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12)), "do not match its dtype"),
    (_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)), "4 bytes after"),
    (_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "leaves a gap"),
    (_header({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "dtype 'C64'"),
    (_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "invalid shape"),
    (_header({"__metadata__": {"a": 1}}), "does not map names to strings"),
    (struct.pack("<Q", 20) + b'{"a":1,"a":2}       ', "names 'a' twice"),
]


@pytest.mark.parametrize("data, why", REFUSED, ids=[why for _, why in REFUSED])
def test_safetensors_refusals(data, why):
    with pytest.raises(st.SafetensorsError, match=why):
        st.decode(data)


# ---- the bundle's initial state ------------------------------------------------------------------
def test_bundle_state_is_safetensors(bundle):
    b = edgetl.runtime.load_bundle(bundle)
    assert b.manifest["state_file"] == "state.safetensors"
    arrays, meta = st.decode((bundle / "state.safetensors").read_bytes())
    assert meta == {"format": "edgetl-state", "version": "1"}
    keys = b.manifest["state_keys"]
    assert set(arrays) == {keys[n] for n in b.tensor_shapes()}
    assert _same(b.initial_state(), {n: arrays[keys[n]] for n in b.tensor_shapes()})


def _reseal(root, rel, data: bytes, keys=None):
    (root / rel).write_bytes(data)
    m = json.loads((root / "manifest.json").read_text())
    m["files"][rel] = sha256(root / rel)
    if keys is not None:
        m["state_file"], m["state_keys"] = rel, keys
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.fixture()
def copy(bundle, tmp_path):
    import shutil
    return shutil.copytree(bundle, tmp_path / "b")


def test_npz_state_of_earlier_bundles_is_read(copy):
    b = edgetl.runtime.load_bundle(copy)
    state = b.initial_state()
    keys = {n: f"a{i}" for i, n in enumerate(state)}
    with open(copy / "state.npz", "wb") as f:
        np.savez(f, **{keys[n]: v for n, v in state.items()})
    _reseal(copy, "state.npz", (copy / "state.npz").read_bytes(), keys)
    assert _same(edgetl.runtime.load_bundle(copy).initial_state(), state)
    Trainer.load(copy)  # and trains from it


def _state_arrays(copy):
    return st.decode((copy / "state.safetensors").read_bytes())[0]


@pytest.mark.parametrize("change, why", [
    (lambda a: a.update({k: v[..., :1] for k, v in list(a.items())[:1]}), "the manifest says float32"),
    (lambda a: a.update({k: v.astype(np.int32) for k, v in list(a.items())[:1]}), "is I32"),
    (lambda a: a.pop(next(iter(a))), "lacks arrays"),
    (lambda a: a.update({k: np.full_like(v, np.nan) for k, v in list(a.items())[:1]}), "NaN or Inf"),
])
def test_state_that_disagrees_with_the_manifest_is_refused(copy, change, why):
    arrays = _state_arrays(copy)
    change(arrays)
    _reseal(copy, "state.safetensors", state_file.encode(arrays) if "I32" not in why else st.encode(arrays))
    with pytest.raises(BundleError, match=why):
        Trainer.load(copy)


def test_truncated_state_is_refused(copy):
    data = (copy / "state.safetensors").read_bytes()
    _reseal(copy, "state.safetensors", data[:-4])
    with pytest.raises(BundleError, match=r"cannot read initial state 'state.safetensors': it declares \d+ bytes"):
        Trainer.load(copy)
    _reseal(copy, "state.safetensors", data[:40])
    with pytest.raises(BundleError, match="beyond the file's 40 bytes"):
        Trainer.load(copy)


# ---- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory, digits):
    t = Trainer.load(bundle)
    path = tmp_path_factory.mktemp("ck") / "model.ckpt"
    t.fit(*digits, epochs=1, lr=LR, schedule="cosine", seed=3, checkpoint=path)
    return t, path


def test_checkpoint_layout_and_round_trip(trained, bundle):
    t, path = trained
    data = path.read_bytes()
    arrays, meta = st.decode(data)
    assert meta["format"] == "edgetl-checkpoint" and meta["version"] == "4"
    assert (meta["step"], meta["epoch"], meta["seed"]) == ("10", "1", "3")
    assert json.loads(meta["schedule"]) == {"name": "cosine", "lr": LR, "total_steps": 10, "start_step": 0}
    assert meta["bundle_manifest"] == t.bundle.manifest[MANIFEST_DIGEST]
    assert _same(arrays, t.get_state())  # named as the manifest names them, in its order
    entries, _, start = st.read_header(data)
    assert meta["sha256"] == ckpt.digest(meta, entries, data[start:])
    u = Trainer.load(bundle)
    u.load_checkpoint(path)
    assert u.step == 10 and u.epoch == 1 and u.seed == 3 and _same(u.get_state(), t.get_state())


def _rewrite(path, arrays, meta, fix_digest=True):
    data = st.encode(arrays, meta)
    if fix_digest:
        entries, _, start = st.read_header(data)
        meta = {**meta, "sha256": ckpt.digest(meta, entries, data[start:])}
        data = st.encode(arrays, meta)
    path.write_bytes(data)


def test_checkpoint_refusals(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    arrays, meta = st.decode(data)
    bad = tmp_path / "bad.ckpt"
    cases = [
        (data[: len(data) - 3], "declares .* bytes of tensor data but holds"),
        (data[:7], "is truncated"),
        (struct.pack("<Q", len(data)) + data[8:], "beyond the file's"),
        (data[:-1] + bytes([data[-1] ^ 1]), "fails its checksum"),
    ]
    for raw, why in cases:
        bad.write_bytes(raw)
        with pytest.raises(CheckpointError, match=why):
            ckpt.load_checkpoint(bad)
    # metadata or the tensor table altered and re-encoded without a new digest: the checksum covers them
    for field, value in [("step", "3"), ("schedule", json.dumps({"name": "constant", "lr": 9.0, "total_steps": 10})),
                         ("extra", "x")]:
        _rewrite(bad, arrays, {**meta, field: value}, fix_digest=False)
        with pytest.raises(CheckpointError, match="fails its checksum"):
            ckpt.load_checkpoint(bad)
    first = next(iter(arrays))
    _rewrite(bad, {**arrays, first: arrays[first].astype(np.float64)}, meta, fix_digest=False)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        ckpt.load_checkpoint(bad)
    # a consistent file with invalid fields, another version, another format
    for m, why in [({**meta, "step": "-1"}, "'step' must be a non-negative integer"),
                   ({**meta, "schedule": "{"}, "'schedule' is not JSON"),
                   ({**meta, "version": "5"}, "format version 5; this runtime reads versions 3 and 4"),
                   ({k: v for k, v in meta.items() if k != "format"}, "not an edgetl checkpoint")]:
        _rewrite(bad, arrays, m)
        with pytest.raises(CheckpointError, match=why):
            ckpt.load_checkpoint(bad)
    _rewrite(bad, {**arrays, first: np.full_like(arrays[first], np.inf)}, meta)
    with pytest.raises(CheckpointError, match="not a finite float array"):
        ckpt.load_checkpoint(bad)


def test_checkpoint_with_another_shape_or_dtype_is_refused_by_the_trainer(trained, bundle, tmp_path):
    t, path = trained
    arrays, meta = st.decode(path.read_bytes())
    first = next(iter(arrays))
    bad = tmp_path / "shape.ckpt"
    _rewrite(bad, {**arrays, first: arrays[first].reshape(-1)[:1]}, meta)
    with pytest.raises(CheckpointError, match="does not match the bundle's tensors"):
        Trainer.load(bundle).load_checkpoint(bad)
    _rewrite(bad, {**arrays, first: arrays[first].astype(np.int32)}, meta)
    with pytest.raises(CheckpointError, match="is not a finite float array"):
        Trainer.load(bundle).load_checkpoint(bad)


def write_v3(path, arrays: dict, meta: dict) -> None:
    """A checkpoint as the runtime wrote it before version 4 (npz, JSON header)."""
    keys = {n: f"a{i}" for i, n in enumerate(arrays)}
    meta = {**meta, "keys": keys}
    header = {"version": 3, **meta, "sha256": ckpt._digest(arrays, meta)}
    with open(path, "wb") as f:
        np.savez(f, __header__=np.array(json.dumps(header)), **{keys[n]: v for n, v in arrays.items()})


def test_version_3_checkpoints_are_resumed(trained, bundle, digits, tmp_path):
    t, path = trained
    arrays, header = ckpt.load_checkpoint(path)
    meta = {k: header[k] for k in ("step", "epoch", "schedule", "seed", "bundle", "bundle_manifest", "target")}
    old = tmp_path / "v3.ckpt"
    write_v3(old, arrays, meta)
    u = Trainer.load(bundle)
    u.load_checkpoint(old)
    assert u.step == 10 and _same(u.get_state(), t.get_state())
    # a fit resumes it and saves version 4 over it
    u = Trainer.load(bundle)
    with pytest.warns(edgetl.runtime.RuntimeNotice, match="stretched"):
        u.fit(*digits, epochs=2, lr=LR, schedule="cosine", seed=3, checkpoint=old)
    assert u.step == 20 and st.decode(old.read_bytes())[1]["version"] == "4"
    assert ckpt.load_checkpoint(f"{old}.prev")[1]["version"] == 3


# ---- the per-batch API ---------------------------------------------------------------------------
def test_train_step_is_fit_one_batch_at_a_time(bundle, digits):
    x, y = digits
    fitted = Trainer.load(bundle)
    fitted.fit(x, y, epochs=2, lr=LR, seed=5)
    t = Trainer.load(bundle)
    losses = []
    for epoch in range(2):
        for idx in t.batches(len(x), seed=5, epoch=epoch):
            loss, ms = t.train_step(x[idx], y[idx], lr=LR)
            losses.append(loss)
    assert t.step == fitted.step == 20 and ms > 0 and np.isfinite(losses).all()
    assert _same(t.get_state(), fitted.get_state())
    whole = t.evaluate(x[:B], y[:B])
    assert t.evaluate_batch(x[:B], y[:B]) == pytest.approx(whole)


def test_train_step_refusals_and_divergence(bundle, digits):
    x, y = digits
    t = Trainer.load(bundle)
    with pytest.raises(InputError, match="batches of exactly 16 samples, got 15"):
        t.train_step(x[:15], y[:15])
    with pytest.raises(InputError, match="lr must be a positive number"):
        t.train_step(x[:B], y[:B], lr=-1)
    state = t.get_state()
    with pytest.raises(DivergenceError, match="step 1 diverged"):
        t.train_step(x[:B], y[:B], lr=1e9)
    assert t.step == 0 and _same(t.get_state(), state)


def test_get_and_set_state(bundle, digits):
    t = Trainer.load(bundle)
    state = t.get_state()
    changed = {k: v + 1 for k, v in state.items()}
    t.set_state(changed)
    assert _same(t.get_state(), changed)
    got = t.get_state()
    next(iter(got.values()))[...] = 42  # a copy: the trainer's own state is untouched
    assert _same(t.get_state(), changed)
    first = next(iter(state))
    for bad, why in [({k: v for k, v in state.items() if k != first}, f"state lacks '{first}'"),
                     ({**state, "other": np.zeros(1)}, "has 'other', which the bundle does not train"),
                     ({**state, first: state[first].reshape(-1)[:1]}, f"state '{first}' is float32\\[1\\]"),
                     ({**state, first: np.full_like(state[first], np.nan)}, "NaN or Inf"),
                     ([1], "must be a dict")]:
        with pytest.raises(InputError, match=why):
            t.set_state(bad)
    assert _same(t.get_state(), changed)
