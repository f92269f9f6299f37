"""Reliability of the device runtime: divergence, damaged or hostile bundles and checkpoints,
pickles never executed, full disks and read-only directories, and SIGKILL at random moments of a
`fit` that checkpoints every step."""
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime import BundleError, CheckpointError, DivergenceError, EdgeRuntimeError, Trainer, load_bundle
from edgetl.runtime.errors import RuntimeNotice
from edgetl.runtime import checkpoint as ckpt
from edgetl.runtime import safetensors as st
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest
from state_files import as_npz_state, rewrite, v3_of, write_v3

B = 16
LR = 0.05


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=LR, momentum=0.9)
    return export(pm, "onnx", tmp_path_factory.mktemp("reliability") / "bundle", opt, batch_size=B)


def _savez(path, **arrays) -> None:
    """np.savez to exactly `path` (np.savez appends .npz to a name without it)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl.runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def _state(t: Trainer) -> dict:
    return {k: v.copy() for k, v in t.backend.get_state().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- divergence ------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [5.0, 1e6, 1e30])
def test_divergence_keeps_a_good_state(bundle, digits, tmp_path, lr):
    """A blow-up is caught by the loss growing or the parameters exploding, not only at NaN/Inf:
    the state kept (and saved to the checkpoint) is one the trainer reached, evaluates to a sane
    loss, and training resumes from it with the advised lower lr."""
    t = Trainer.load(bundle)
    start_loss = t.evaluate(*digits)["loss"]
    before_each_step = []  # the trainer's state before every attempted step
    real_step = t.backend.train_step

    def recording_step(x, y, step_lr):
        before_each_step.append((t.step, _state(t)))
        return real_step(x, y, step_lr)

    t.backend.train_step = recording_step
    ck = tmp_path / "ck.npz"
    with pytest.raises(DivergenceError) as info:
        t.fit(*digits, epochs=5, lr=lr, checkpoint=ck, checkpoint_every=1)
    msg = str(info.value)
    assert "lower learning rate" in msg and "\n" not in msg
    assert f"kept at step {t.step} and saved to checkpoint '{ck}'" in msg
    step, kept = before_each_step[t.step]
    assert step == t.step and _same(_state(t), kept)
    loss = t.evaluate(*digits)["loss"]
    assert loss < 2 * start_loss, (loss, start_loss)  # finite is not enough: a sane loss
    arrays, header = ckpt.load_checkpoint(ck)
    assert header["step"] == t.step and _same(arrays, kept)
    prev = ckpt.previous_path(ck)  # the diverged state is no generation either
    assert not prev.exists() or ckpt.load_checkpoint(prev)[1]["step"] <= t.step
    t2 = Trainer.load(bundle)
    with pytest.warns(RuntimeNotice, match=re.escape(f"at step {t.step} with lr 0.05 instead of its {lr:.3g}")):
        t2.fit(*digits, epochs=5, lr=LR, checkpoint=ck, checkpoint_every=1)
    assert t2.evaluate(*digits)["accuracy"] > 0.9


def test_divergence_with_per_epoch_checkpoints_saves_what_it_keeps(bundle, digits, tmp_path):
    t = Trainer.load(bundle)
    ck = tmp_path / "ck.npz"
    t.fit(*digits, epochs=1, lr=LR, checkpoint=ck)
    with pytest.raises(DivergenceError, match="kept at step 10 and saved to checkpoint") as info, \
            pytest.warns(RuntimeNotice, match="with lr 1e\\+06 instead of its 0.05"):
        Trainer.load(bundle).fit(*digits, epochs=3, lr=1e6, checkpoint=ck)
    arrays, header = ckpt.load_checkpoint(ck)
    assert header["step"] == 10 and _same(arrays, _state(t)), str(info.value)


def test_divergence_by_loss_growth_rolls_back_two_steps(bundle, digits):
    """A finite but exploding loss is the loss of the state *before* that step: the trainer goes
    back to the state before the previous step, whose loss was sane."""
    t = Trainer.load(bundle)
    states = []
    real_step = t.backend.train_step

    def exploding_loss(x, y, lr):
        states.append(_state(t))
        loss, logits = real_step(x, y, lr)
        return (loss * 1e3 if t.step == 6 else loss), logits

    t.backend.train_step = exploding_loss
    with pytest.raises(DivergenceError, match="step 7 diverged .*kept at step 5"):
        t.fit(*digits, epochs=1, lr=LR)
    assert t.step == 5 and _same(_state(t), states[5])


def test_resume_with_a_lower_lr(bundle, digits, tmp_path):
    """After a divergence the advice is a lower lr: an explicit lr wins over the checkpoint's,
    while the step count and the schedule's length carry on."""
    t = Trainer.load(bundle)
    ck = tmp_path / "ck.npz"
    real_step = t._train_step

    def interrupted(x, y):
        if t.step == 13:
            raise KeyboardInterrupt
        return real_step(x, y)

    t._train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        t.fit(*digits, epochs=3, lr=LR, schedule="cosine", checkpoint=ck, checkpoint_every=5)
    t2 = Trainer.load(bundle)
    with pytest.warns(RuntimeNotice, match="with lr 0.005 instead of its 0.05"):
        r = t2.fit(*digits, epochs=3, lr=LR / 10, schedule="cosine", checkpoint=ck, checkpoint_every=5)
    assert len(r.losses) == 20 and r.steps == 30
    assert t2.schedule == {"name": "cosine", "lr": LR / 10, "total_steps": 30, "start_step": 0}
    t3 = Trainer.load(bundle)
    t3.fit(*digits, epochs=3, lr=LR, schedule="cosine", checkpoint=tmp_path / "other.npz")
    assert t2.lr_at(17) == t3.lr_at(17) / 10


def test_divergence_in_the_parameters_only(bundle, digits):
    """A finite loss with non-finite new parameters is rejected as well (the real step, then an
    overflow injected into the new parameters)."""
    t = Trainer.load(bundle)
    t.fit(*digits, epochs=1, lr=LR)
    good = _state(t)
    real_step = t.backend.train_step

    def overflowing_step(x, y, lr):
        loss, logits = real_step(x, y, lr)
        t.backend.params[0] = np.full_like(t.backend.params[0], np.inf)
        return loss, logits

    t.backend.train_step = overflowing_step
    with pytest.raises(DivergenceError, match="lower learning rate"):
        t.fit(*digits, epochs=1, lr=LR)
    assert t.step == 10 and _same(_state(t), good)


def test_cli_divergence_exits_2_with_one_line(bundle, data_file, tmp_path):
    r = _cli("fit", bundle, "--data", data_file, "--epochs", "3", "--lr", "1e30", "--no-progress", "--json",
             "--checkpoint", tmp_path / "ck.npz", "--checkpoint-every", "1")
    line = _one_line_error(r, "diverged", "lower learning rate")
    assert r.stdout == ""
    step = ckpt.load_checkpoint(tmp_path / "ck.npz")[1]["step"]
    assert f"kept at step {step}" in line


# ---- bundles ---------------------------------------------------------------------------------
def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: dict, seal: bool = True) -> None:
    """Write a (tampered) manifest; sealed by default with a recomputed checksum, as a careful
    attacker would, so the checks behind the manifest's own checksum are exercised too."""
    if seal and isinstance(m, dict):
        try:
            m = {**m, MANIFEST_DIGEST: manifest_digest(m)}
        except (ValueError, TypeError, RecursionError):
            pass
    (b / "manifest.json").write_text(json.dumps(m))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(b: Path, *words: str) -> str:
    with pytest.raises(BundleError) as info:
        Trainer.load(b)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def _truncate(b, rel="train_step.onnx"):
    p = b / rel
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(b, rel="state.safetensors"):
    p = b / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


_DELETE = object()


def _edit(_seal: bool = True, **changes):
    def apply(b):
        m = _manifest(b)
        for path, value in changes.items():
            node = m
            *parents, last = path.split("__")
            for k in parents:
                node = node[k]
            if value is _DELETE:
                del node[last]
            else:
                node[last] = value
        _write_manifest(b, m, _seal)
    return apply


def _foreign_program(b):
    """A real ONNX file from elsewhere, under the eval program's name, with a correct checksum."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(b / "eval.onnx"))
    _rehash(b, "eval.onnx")


def _garbage_program(b):
    (b / "train_step.onnx").write_bytes(os.urandom(4096))
    _rehash(b, "train_step.onnx")


def _rehash(b, rel):
    m = _manifest(b)
    m["files"][rel] = _digest(b / rel)
    _write_manifest(b, m)


def _foreign_state(b):
    (b / "state.safetensors").write_bytes(st.encode({"a0": np.zeros(3, np.float32)}))
    _rehash(b, "state.safetensors")


def _wrong_shape_state(b):
    arrays = st.decode((b / "state.safetensors").read_bytes())[0]
    arrays[next(iter(arrays))] = np.zeros(7, np.float32)
    (b / "state.safetensors").write_bytes(st.encode(arrays))
    _rehash(b, "state.safetensors")


def _outside(rel_from_bundle: str, make_link: bool = False):
    def apply(b):
        outside = b.parent / "outside.onnx"
        shutil.copy(b / "eval.onnx", outside)
        m = _manifest(b)
        if make_link:
            (b / "eval.onnx").unlink()
            (b / "eval.onnx").symlink_to(outside)
            rel = "eval.onnx"
        else:
            rel = rel_from_bundle if rel_from_bundle != "ABS" else str(outside)
            del m["files"]["eval.onnx"]
            m["files"][rel] = _digest(outside)
            m["programs"]["eval"] = rel
        _write_manifest(b, m)
    return apply


def _symlink_loop(b):
    (b / "loop").symlink_to(b / "loop")
    m = _manifest(b)
    m["files"]["loop"] = "0" * 64
    _write_manifest(b, m)


def _manifest_link(b):
    shutil.move(b / "manifest.json", b.parent / "elsewhere.json")
    (b / "manifest.json").symlink_to(b.parent / "elsewhere.json")


def _set_digest(b, rel, value):
    m = _manifest(b)
    m["files"][rel] = value
    _write_manifest(b, m)


def _sealed_then(**changes):
    """The manifest given its own checksum, then altered."""
    def apply(b):
        m = _manifest(b)
        m[MANIFEST_DIGEST] = manifest_digest(m)
        _write_manifest(b, m)
        Trainer.load(b)  # sealed and intact: fine
        _edit(_seal=False, **changes)(b)
    return apply


def _del_file_entry(b, rel):
    m = _manifest(b)
    del m["files"][rel]
    _write_manifest(b, m)


BUNDLE_CASES = {
    "truncated program": (_truncate, ("train_step.onnx", "sha256")),
    "altered state": (_flip, ("state.safetensors", "sha256")),
    "truncated manifest": (lambda b: (b / "manifest.json").write_bytes((b / "manifest.json").read_bytes()[:500]),
                           ("not valid JSON",)),
    "binary manifest": (lambda b: (b / "manifest.json").write_bytes(os.urandom(300)), ("not valid JSON",)),
    "altered manifest (batch size)": (_sealed_then(input__batch_size=17), ("manifest.json", "sha256")),
    "altered manifest (mean)": (_sealed_then(input__preprocess__mean=[0.1308]), ("manifest.json", "sha256")),
    "altered manifest checksum": (_sealed_then(manifest_sha256="ab" * 32), ("manifest.json", "sha256")),
    "foreign manifest": (lambda b: (b / "manifest.json").write_text('{"name": "left-pad", "version": "1.3.0"}'),
                         ("not an edgetl bundle",)),
    "foreign program": (_foreign_program, ("cannot load",)),
    "garbage program": (_garbage_program, ("cannot load",)),
    "foreign state": (_foreign_state, ("initial state",)),
    "state of another shape": (_wrong_shape_state, ("initial state", "manifest says")),
    "version 2": (_edit(format_version=2), ("version 2", "re-export")),
    "version '1'": (_edit(format_version="1"), ("version",)),
    "version true": (_edit(format_version=True), ("version",)),
    "no version": (_edit(format_version=_DELETE), ("version",)),
    "checksum mismatch": (lambda b: _set_digest(b, "eval.onnx", "ab" * 32), ("eval.onnx", "sha256")),
    "malformed checksum": (lambda b: _set_digest(b, "eval.onnx", 42), ("sha256",)),
    "missing program file": (lambda b: (b / "eval.onnx").unlink(), ("eval.onnx", "missing")),
    "missing program role": (_edit(programs__eval=_DELETE), ("program", "eval")),
    "files omit a program": (lambda b: _del_file_entry(b, "eval.onnx"), ("eval.onnx", "no checksum")),
    "files omit the state": (lambda b: _del_file_entry(b, "state.safetensors"), ("state.safetensors", "no checksum")),
    "programs not a dict": (_edit(programs=["train_step.onnx", "eval.onnx"]), ("programs",)),
    "files not a dict": (_edit(files=["train_step.onnx"]), ("files",)),
    "unknown target": (_edit(target="tflite"), ("unknown target",)),
    "batch size a string": (_edit(input__batch_size="16"), ("batch_size",)),
    "parent path": (_outside("../outside.onnx"), ("outside the bundle",)),
    "nested parent path": (_outside("sub/../../outside.onnx"), ("outside the bundle",)),
    "absolute path": (_outside("ABS"), ("not a relative path",)),
    "symlink leading out": (_outside("", make_link=True), ("eval.onnx", "outside the bundle")),
    "symlink loop": (_symlink_loop, ("loop",)),
    "manifest symlink leading out": (_manifest_link, ("outside the bundle",)),
    "not a directory": (lambda b: shutil.rmtree(b) or b.write_text("x"), ("is a file, not a directory",)),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bad_bundle_is_refused_on_load(bundle, tmp_path, case):
    damage, words = BUNDLE_CASES[case]
    b = _copy(bundle, tmp_path)
    Trainer.load(b)  # intact before the damage
    damage(b)
    _refused(b, *words)


def test_manifest_that_disagrees_with_its_programs(bundle, tmp_path):
    """A manifest without its own checksum, altered to disagree with the programs (batch size,
    input size, io names, program roles), is refused when the bundle loads, before any training."""
    for change, words in [({"input__batch_size": 8}, "does not match its programs"),
                          ({"input__shape": [1, 28, 27]}, "does not match its programs"),
                          ({"io__params__head.bias": "param.4"}, "two parameters the same program input"),
                          ({"programs__eval": "train_step.onnx"}, "the 'eval' program")]:
        b = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(bundle, b)
        m = _manifest(b)
        for path, value in change.items():
            node = m
            *parents, last = path.split("__")
            for k in parents:
                node = node[k]
            node[last] = value
        _write_manifest(b, m)
        with pytest.raises(BundleError, match=words) as info:
            Trainer.load(b)
        assert "\n" not in str(info.value)


def test_cli_refuses_a_bad_bundle_with_one_line(bundle, data_file, tmp_path):
    b = _copy(bundle, tmp_path)
    _truncate(b)
    _one_line_error(_cli("fit", b, "--data", data_file, "--json"), "sha256")
    b2 = tmp_path / "b2"
    shutil.copytree(bundle, b2)
    _foreign_program(b2)
    _one_line_error(_cli("evaluate", b2, "--data", data_file, "--json"), "cannot load")


def test_symlink_inside_the_bundle_is_fine(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "programs").mkdir()
    shutil.move(b / "eval.onnx", b / "programs" / "eval.onnx")
    (b / "eval.onnx").symlink_to(Path("programs") / "eval.onnx")
    Trainer.load(b)


# ---- pickles are never executed --------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker directory."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _assert_live(payload: Payload, marker: Path) -> None:
    """The payload really runs when unpickled (so the tests below are not vacuous)."""
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.rmdir()


def _object_npz(path: Path, marker: Path, **arrays) -> None:
    obj = np.empty(1, dtype=object)
    obj[0] = Payload(marker)
    _savez(path, **arrays, evil=obj)  # np.savez pickles object arrays


@pytest.mark.parametrize("kind", ["object array in npz", "raw pickle", "object array named as a state key"])
def test_pickled_state_is_not_unpickled(bundle, tmp_path, kind):
    marker = tmp_path / "PWNED"
    _assert_live(Payload(marker), marker)
    b = _copy(bundle, tmp_path)
    state = as_npz_state(b)  # safetensors cannot hold a pickle: a bundle of an earlier edgetl can
    if kind == "raw pickle":
        state.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "object array in npz":
        with np.load(state) as z:
            arrays = dict(z)
        _object_npz(state, marker, **arrays)
    else:
        with np.load(state) as z:
            arrays = dict(z)
        obj = np.empty(arrays["a0"].shape, dtype=object)
        obj[:] = [Payload(marker)] * obj.size
        arrays["a0"] = obj
        _savez(state, **arrays)
    _rehash(b, "state.npz")
    load_bundle(b)  # the checksum is right
    _refused(b, "state.npz", "not a safetensors file" if kind == "raw pickle" else "holds pickled objects (")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["object array in npz", "raw pickle", "object header"])
def test_pickled_checkpoint_is_not_unpickled(bundle, digits, tmp_path, kind):
    marker = tmp_path / "PWNED"
    _assert_live(Payload(marker), marker)
    t = Trainer.load(bundle)
    good = _state(t)
    path = tmp_path / "ck.npz"
    t.save_checkpoint(tmp_path / "ck4")
    v3_of(tmp_path / "ck4", path)  # safetensors cannot hold a pickle: an npz of an earlier edgetl can
    if kind == "raw pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "object array in npz":
        with np.load(path) as z:
            arrays = dict(z)
        _object_npz(path, marker, **arrays)
    else:
        with np.load(path) as z:
            arrays = dict(z)
        obj = np.empty((), dtype=object)
        obj[()] = Payload(marker)
        arrays["__header__"] = obj
        _savez(path, **arrays)
    with pytest.raises(CheckpointError) as info:
        t.load_checkpoint(path)
    assert str(info.value) == (f"checkpoint '{path}' is corrupt or not an edgetl checkpoint: it declares a header of "
                               f"{int.from_bytes(path.read_bytes()[:8], 'little')} bytes, more than the 16777216 "
                               f"allowed; it is not a safetensors file" if kind == "raw pickle" else
                               f"checkpoint '{path}' holds pickled objects, which are refused")
    assert not marker.exists() and _same(_state(t), good) and t.step == 0


def test_pickled_data_file_is_not_unpickled(bundle, digits, tmp_path):
    marker = tmp_path / "PWNED"
    _assert_live(Payload(marker), marker)
    x, y = digits
    path = tmp_path / "data.npz"
    obj = np.empty(len(x), dtype=object)
    obj[:] = [Payload(marker)] * len(x)
    _savez(path, x_train=obj, y_train=y, x_test=x, y_test=y)
    _one_line_error(_cli("fit", bundle, "--data", path), "pickled")
    assert not marker.exists()


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.fixture()
def trained(bundle, digits, tmp_path):
    """(trainer after 10 steps, its checkpoint at step 10, that state)."""
    t = Trainer.load(bundle)
    path = tmp_path / "ck" / "model.ckpt"
    t.fit(*digits, epochs=1, lr=LR, schedule="cosine", checkpoint=path)
    return t, path, _state(t)


SCHEDULE_10 = {"name": "cosine", "lr": LR, "total_steps": 10, "start_step": 0}


def _assert_intact(t, path, state, step=10):
    """`path` holds exactly the checkpoint of the `trained` fixture, and nothing is beside it but
    its previous generation."""
    arrays, header = ckpt.load_checkpoint(path)
    assert header["step"] == step and _same(arrays, state)
    t2 = Trainer.load(t.bundle.root)
    t2.load_checkpoint(path)
    assert t2.step == step and _same(_state(t2), state) and t2.schedule == SCHEDULE_10
    names = sorted(p.name for p in path.parent.iterdir())
    assert names in ([path.name], [path.name, path.name + ".prev"]), f"a temporary file was left behind: {names}"


def test_checkpoint_round_trip_and_tampering(trained, bundle, tmp_path):
    t, path, state = trained
    _assert_intact(t, path, state)
    data = path.read_bytes()
    # a flipped byte anywhere in the arrays' region, a truncation, an empty file
    for bad in (data[: len(data) // 2], b"", data[:-1], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError):
            Trainer.load(bundle).load_checkpoint(path)
    # metadata altered and the file re-written correctly: the checksum covers the metadata too
    arrays, metadata = st.decode(data)
    for field, value in [("step", "3"), ("epoch", "7"),
                         ("schedule", json.dumps({"name": "constant", "lr": 9.0, "total_steps": 10}))]:
        rewrite(path, arrays, {**metadata, field: value}, fix_digest=False)
        with pytest.raises(CheckpointError, match="checksum"):
            ckpt.load_checkpoint(path)
    # an array altered
    first = next(iter(arrays))
    rewrite(path, {**arrays, first: arrays[first] + 1}, metadata, fix_digest=False)
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load_checkpoint(path)


def test_checkpoint_of_another_bundle_or_version(trained, bundle, digits, tmp_path):
    t, path, state = trained
    other = tmp_path / "other"
    pm = edgetl.prepare("mnist_cnn", "head", num_classes=10)
    export(pm, "onnx", other, edgetl.OptimizerConfig.make("sgd", lr=LR, momentum=0.9), batch_size=B)
    t2 = Trainer.load(other)
    with pytest.raises(CheckpointError, match="another bundle"):
        t2.load_checkpoint(path)
    # the same files under another manifest (preprocessing altered, resealed): another bundle too
    same_files = _copy(bundle, tmp_path)
    m = _manifest(same_files)
    m["input"]["preprocess"]["mean"] = [0.5]
    _write_manifest(same_files, m)
    t3 = Trainer.load(same_files)
    assert t3.bundle.manifest["files"] == t.bundle.manifest["files"]
    with pytest.raises(CheckpointError, match="another bundle"):
        t3.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="another bundle"):
        t3.fit(*digits, epochs=1, schedule="cosine", checkpoint=path)
    assert t3.step == 0
    arrays = {k: v for k, v in state.items()}
    meta = {"step": 1, "epoch": 0, "schedule": t.schedule, "bundle": t.bundle.manifest["files"], "target": "onnx",
            "bundle_manifest": t.bundle.manifest[MANIFEST_DIGEST], "seed": 0}
    ckpt.save_checkpoint(tmp_path / "short.npz", {k: arrays[k] for k in list(arrays)[:-1]}, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer.load(bundle).load_checkpoint(tmp_path / "short.npz")
    arrays, header = ckpt.load_checkpoint(path)
    meta = {k: v for k, v in header.items() if k not in ("format", "version", "sha256")}
    write_v3(tmp_path / "v1.npz", arrays, meta, {"version": 1})
    with pytest.raises(CheckpointError, match="version 1"):
        ckpt.load_checkpoint(tmp_path / "v1.npz")
    # before checkpoints named their bundle's manifest digest and seed
    write_v3(tmp_path / "v2.npz", arrays, meta, {"version": 2})
    with pytest.raises(CheckpointError, match="version 2; this runtime reads versions 3 and 4"):
        ckpt.load_checkpoint(tmp_path / "v2.npz")
    write_v3(tmp_path / "v3.npz", arrays, meta)  # still read
    assert ckpt.load_checkpoint(tmp_path / "v3.npz")[1]["step"] == header["step"]


class _FailingFile:
    """Writes half of what it is given, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["write", "fsync", "rename", "mkstemp EROFS", "mkstemp EACCES"])
def test_full_disk_or_read_only_keeps_the_previous_checkpoint(trained, digits, monkeypatch, where):
    t, path, state = trained
    t.fit(*digits, epochs=1, lr=LR)  # move on: the next save would differ
    assert t.step == 20
    real_fdopen = os.fdopen

    def fail(code):
        def raiser(*a, **k):
            raise OSError(code, os.strerror(code))
        return raiser

    if where == "write":
        monkeypatch.setattr(ckpt.os, "fdopen", lambda *a, **k: _FailingFile(real_fdopen(*a, **k)))
    elif where == "fsync":
        monkeypatch.setattr(ckpt.os, "fsync", fail(errno.ENOSPC))
    elif where == "rename":
        monkeypatch.setattr(ckpt.os, "replace", fail(errno.EIO))
    else:
        code = errno.EROFS if "EROFS" in where else errno.EACCES
        monkeypatch.setattr(ckpt.tempfile, "mkstemp", fail(code))
    before = _state(t)
    with pytest.raises(CheckpointError) as info:
        t.save_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert str(info.value).endswith("; the previous checkpoint is intact")
    assert _same(_state(t), before) and t.step == 20  # saving never changes the trainer
    fresh = path.with_name("fresh.ckpt")  # no previous checkpoint: the message does not claim one
    with pytest.raises(CheckpointError) as info:
        t.save_checkpoint(fresh)
    assert str(info.value).endswith("; no checkpoint was written") and not fresh.exists()
    monkeypatch.undo()
    _assert_intact(t, path, state)


def test_checkpoint_path_under_a_file_or_a_directory(trained, tmp_path):
    t, path, state = trained
    (tmp_path / "plain").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        t.save_checkpoint(tmp_path / "plain" / "ck.npz")
    (tmp_path / "adir").mkdir()
    with pytest.raises(CheckpointError, match="cannot write"):
        t.save_checkpoint(tmp_path / "adir")
    assert (tmp_path / "plain").read_text() == "x" and list((tmp_path / "adir").iterdir()) == []


def test_real_file_size_limit_keeps_the_previous_checkpoint(trained, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG) in a real process: CheckpointError,
    one line, exit code 2 from the CLI, previous checkpoint intact."""
    t, path, state = trained
    size = path.stat().st_size
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))\n"
        "from edgetl.runtime.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    data = tmp_path / "d.npz"
    x = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    y = np.arange(32) % 10
    _savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    r = subprocess.run([sys.executable, "-c", code, "fit", str(t.bundle.root), "--data", str(data), "--epochs", "6",
                        "--schedule", "cosine", "--checkpoint", str(path), "--checkpoint-every", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    # resuming to 12 steps stretches the checkpoint's 10-step cosine schedule: a warning line first
    notice, error = r.stderr.strip().splitlines()
    assert notice.startswith("edgetl.runtime: warning: ") and "stretched to end at step 12" in notice
    _one_line_error(subprocess.CompletedProcess(r.args, r.returncode, r.stdout, error + "\n"),
                    "cannot write checkpoint", "the previous checkpoint is intact")
    _assert_intact(t, path, state)


def _mount_tmpfs(where: Path, size_kb: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_real_full_disk_and_read_only_mount(trained, digits):
    """A tiny tmpfs, filled up, then remounted read-only (needs root with mount rights; skipped
    otherwise; the monkeypatched tests above cover the same paths everywhere)."""
    t, path, state = trained
    where = Path(tempfile.mkdtemp(prefix="edgetl-tmpfs-"))
    if not _mount_tmpfs(where, 256):
        where.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        ck = where / "model.ckpt"
        t.save_checkpoint(ck)
        t.fit(*digits, epochs=1, lr=LR)
        try:  # fill the disk
            with open(where / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        with pytest.raises(CheckpointError, match="No space left"):
            t.save_checkpoint(ck)
        assert sorted(p.name for p in where.iterdir()) == ["filler", "model.ckpt"]
        assert ckpt.load_checkpoint(ck)[1]["step"] == 10 and _same(ckpt.load_checkpoint(ck)[0], state)
        os.unlink(where / "filler")
        assert subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True).returncode == 0
        with pytest.raises(CheckpointError, match="Read-only"):
            t.save_checkpoint(ck)
        assert ckpt.load_checkpoint(ck)[1]["step"] == 10
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()


def test_read_only_directory_by_permissions(trained, tmp_path):
    """chmod a-w: effective for a non-root user; root ignores it, so then the save is attempted
    by a child process running as 'nobody'."""
    t, path, state = trained
    d = Path(tempfile.mkdtemp(prefix="edgetl-ro-"))
    try:
        os.chmod(d, 0o755)
        ck = d / "model.ckpt"
        shutil.copy(path, ck)
        os.chmod(d, 0o555)
        if os.geteuid() != 0:
            with pytest.raises(CheckpointError, match="Permission denied"):
                t.save_checkpoint(ck)
        else:
            import pwd

            try:
                nobody = pwd.getpwnam("nobody").pw_uid
            except KeyError:
                pytest.skip("no 'nobody' user to drop to")
            code = (
                "import sys, numpy as np\n"
                "from edgetl.runtime import checkpoint as c, CheckpointError\n"
                "arrays, header = c.load_checkpoint(sys.argv[1])\n"
                "header['step'] += 1\n"
                "try:\n"
                "    c.save_checkpoint(sys.argv[1], arrays, {k: v for k, v in header.items() if k not in "
                "('version', 'sha256', 'keys')})\n"
                "except CheckpointError as e:\n"
                "    print(e); sys.exit(3)\n"
            )
            def as_nobody(*args):
                return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                                      user=nobody, cwd="/", env={**os.environ, "HOME": "/"})

            # Whether the runtime can run as 'nobody' at all is asked first, apart: only that may
            # skip; whatever the save itself does (a crash included) is checked.
            try:
                probe = as_nobody("-c", "from edgetl.runtime import checkpoint; print('ok')")
            except OSError as e:  # e.g. the interpreter lives under /root
                pytest.skip(f"cannot run the runtime as 'nobody' here: {e}")
            if probe.returncode != 0 or probe.stdout.strip() != "ok":
                pytest.skip(f"cannot run the runtime as 'nobody' here: {probe.stderr[-300:]}")
            r = as_nobody("-c", code, str(ck))
            assert r.returncode == 3 and "Permission denied" in r.stdout, r.stdout + r.stderr
        assert ckpt.load_checkpoint(ck)[1]["step"] == 10 and _same(ckpt.load_checkpoint(ck)[0], state)
    finally:
        os.chmod(d, 0o755)
        shutil.rmtree(d)


@pytest.mark.parametrize("moment", ["write", "fsync", "rename"])
def test_killed_in_the_middle_of_a_checkpoint_write(trained, moment):
    """A process killed (SIGKILL) at a chosen point of save_checkpoint: half-way through writing
    the temporary file, before its fsync, or just before the rename. The previous checkpoint is
    intact; the next successful save removes the torn temporary file."""
    t, path, state = trained
    code = (
        "import os, signal, sys\n"
        "from edgetl.runtime import checkpoint as c\n"
        "arrays, header = c.load_checkpoint(sys.argv[1])\n"
        "meta = {k: v for k, v in header.items() if k not in ('version', 'sha256', 'keys')}\n"
        "meta['step'] += 1\n"
        "arrays = {k: v + 1 for k, v in arrays.items()}\n"
        "die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "moment = sys.argv[2]\n"
        "if moment == 'write':\n"
        "    real = os.fdopen\n"
        "    class Half:\n"
        "        def __init__(self, f): self.f = f\n"
        "        def __enter__(self): return self\n"
        "        def __exit__(self, *e): pass\n"
        "        def write(self, d): self.f.write(d[: len(d) // 2]); self.f.flush(); die()\n"
        "    os.fdopen = lambda *a, **k: Half(real(*a, **k))\n"
        "elif moment == 'fsync':\n"
        "    os.fsync = die\n"
        "else:\n"
        "    os.replace = die\n"
        "c.save_checkpoint(sys.argv[1], arrays, meta)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path), moment], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    temps = [p for p in path.parent.iterdir() if p.name != path.name]
    # the new checkpoint's temporary file (and, killed at the rename, the link that was to become
    # the previous generation)
    assert len(temps) == (2 if moment == "rename" else 1) and all(p.name.endswith(".tmp") for p in temps)
    torn = next(p for p in temps if not p.name.endswith(".prev.tmp"))
    assert torn.stat().st_size > 0
    arrays, header = ckpt.load_checkpoint(path)
    assert header["step"] == 10 and _same(arrays, state)
    if moment == "write":
        with pytest.raises(CheckpointError):  # the torn file is no checkpoint
            ckpt.load_checkpoint(torn)
    t.save_checkpoint(path)
    _assert_intact(t, path, state)


# ---- SIGKILL at random moments ---------------------------------------------------------------
KILLS = 25
EPOCHS = 10  # 100 steps of batch 16 over 160 samples
KILL_SEED = 14  # the moments are drawn from a fixed seed: the same kills on every run


def _checkpoint_step(ck: Path) -> int | None:
    try:
        return ckpt.load_checkpoint(ck)[1]["step"]
    except CheckpointError:
        return None


@pytest.mark.slow  # ~100 s: 25 runs of the device CLI
def test_sigkill_at_random_moments(bundle, digits, data_file, tmp_path):
    """Kill `python -m edgetl.runtime fit --checkpoint-every 1` with SIGKILL, KILLS times: mostly
    once its checkpoint has reached a drawn step, a drawn fraction of a step later (mid-step or
    mid-save), sometimes a drawn time after start (start-up included). After every kill the
    checkpoint (if any) loads, is a state the uninterrupted run reached at that step, and never
    goes back; a kill after a drawn step always finds the checkpoint at or past it; each run
    resumes the step count and the cosine schedule; a run to the end matches the uninterrupted
    run. No outcome depends on the machine's speed or load: the kills are placed by checkpoint
    steps, and the wall-clock delays only move them within a step."""
    t0 = time.perf_counter()
    # The uninterrupted run, recording every state it reaches.
    ref = Trainer.load(bundle)
    reached = {0: _state(ref)}
    real_step = ref._train_step

    def recording(x, y):
        out = real_step(x, y)
        reached[ref.step] = _state(ref)
        return out

    ref._train_step = recording
    step_s = ref.fit(*digits, epochs=EPOCHS, lr=LR, schedule="cosine", seed=7).step_ms_median / 1000
    total = ref.step
    assert total == EPOCHS * 10 and len(reached) == total + 1

    ck = tmp_path / "run" / "model.ckpt"
    ck.parent.mkdir()
    args = [sys.executable, "-m", "edgetl.runtime", "fit", str(bundle), "--data", str(data_file), "--epochs",
            str(EPOCHS), "--lr", str(LR), "--schedule", "cosine", "--seed", "7", "--checkpoint", str(ck),
            "--checkpoint-every", "1", "--no-progress", "--json"]
    rng = random.Random(KILL_SEED)
    last_step, steps_seen, torn_writes, kills, completed, max_dev = 0, set(), 0, 0, 0, 0.0
    targeted = reached_target = 0
    while kills < KILLS:
        target = None
        if rng.random() >= 0.2:  # once the checkpoint reaches a drawn step; near the end, start over
            target = last_step + rng.randint(1, 8)
            if target > total - 15:
                ck.unlink(missing_ok=True)
                last_step, target = 0, rng.randint(1, 8)
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if target is None:  # anywhere, start-up included
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            while p.poll() is None and (_checkpoint_step(ck) or 0) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 1.5) * step_s)  # within the next step or its save
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
            targeted += target is not None
        out, err = p.communicate(timeout=300)
        if p.returncode == 0:  # finished before the kill: start over
            completed += 1
            assert json.loads(out)["steps"] == total
            assert ckpt.load_checkpoint(ck)[1]["step"] == total
            ck.unlink()
            last_step = 0
            continue
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        torn_writes += any(q.name.endswith(".tmp") for q in ck.parent.iterdir())
        if not ck.exists():
            assert target is None
            continue
        arrays, header = ckpt.load_checkpoint(ck)  # never corrupt
        step = header["step"]
        assert last_step <= step <= total
        if target is not None:
            assert step >= target
            reached_target += 1
        for k, v in arrays.items():
            np.testing.assert_allclose(v, reached[step][k], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {k}")
            max_dev = max(max_dev, float(np.abs(v - reached[step][k]).max(initial=0)))
        resumed = Trainer.load(bundle)
        resumed.load_checkpoint(ck)
        assert resumed.step == step and resumed.lr_at(step) == ref.lr_at(step)
        assert resumed.schedule == ref.schedule
        last_step = step
        steps_seen.add(step)
    # the last run, uninterrupted: continues the count and the schedule to the very end
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == total
    arrays, header = ckpt.load_checkpoint(ck)
    assert header["step"] == total
    for k, v in arrays.items():
        np.testing.assert_allclose(v, reached[total][k], rtol=1e-5, atol=1e-6)
    # stale temporary files and the lock cleaned up; the previous generation kept
    assert sorted(q.name for q in ck.parent.iterdir()) == [ck.name, ck.name + ".prev"]
    elapsed = time.perf_counter() - t0
    print(f"\nSIGKILL test: {kills} kills ({targeted} after a drawn checkpoint step), {len(steps_seen)} distinct "
          f"checkpoint steps seen (up to {max(steps_seen, default=0)} of {total}), {torn_writes} kills left a torn "
          f"temporary file, {completed} runs reached the end and started over, max deviation from the "
          f"uninterrupted run {max_dev:.2g}, {elapsed:.1f} s")
    assert reached_target == targeted >= KILLS // 2
