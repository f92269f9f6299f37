"""Bad input to Trainer.fit / evaluate / predict and to the device CLI: each is refused with an
InputError (a ValueError of edgetl's own) whose one-line message names the problem, or, from the
CLI, one line on stderr and exit code 2; the trainer's state is unchanged after every refusal."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime import EdgeRuntimeError, InputError, Trainer

B = 16  # the bundle's batch size


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    return export(pm, "onnx", tmp_path_factory.mktemp("bad_input") / "bundle", opt, batch_size=B)


@pytest.fixture(scope="module")
def digits():
    from edgetl.datasets import load_dataset

    ds = load_dataset("digits", input_size=28, channels=1)
    return ds.x_train[:64], ds.y_train[:64]


@pytest.fixture(scope="module")
def trainer(bundle, digits):
    """A trainer that has taken a few steps, so that 'unchanged' is not the initial state."""
    t = Trainer.load(bundle)
    t.fit(*digits, epochs=1, lr=0.05, schedule="cosine")
    assert t.step == 4
    return t


def snapshot(t: Trainer) -> dict:
    return {"step": t.step, "epoch": t.epoch, "schedule": dict(t.schedule),
            "state": {k: v.copy() for k, v in t.backend.get_state().items()}}


def assert_unchanged(t: Trainer, before: dict) -> None:
    after = snapshot(t)
    assert (after["step"], after["epoch"], after["schedule"]) == (before["step"], before["epoch"], before["schedule"])
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert np.array_equal(after["state"][k], v), f"{k} changed by a rejected call"


def refused(t: Trainer, call, *words: str) -> str:
    before = snapshot(t)
    with pytest.raises(InputError) as info:
        call()
    assert_unchanged(t, before)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EdgeRuntimeError)
    assert "\n" not in msg and msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


# ---- images ----------------------------------------------------------------------------------
def _bad_images(x):
    return {
        "no channel axis": (x[:, 0], "shape"),
        "three channels": (np.repeat(x, 3, axis=1), "shape"),
        "wrong size": (np.zeros((len(x), 1, 32, 32), np.float32), "shape"),
        "flattened": (x.reshape(len(x), -1), "shape"),
        "one image": (x[0], "shape"),
        "channels last": (x.transpose(0, 2, 3, 1), "shape"),
        "uint8 pixels": ((x * 255).astype(np.uint8), "dtype"),
        "int pixels": (x.astype(np.int64), "dtype"),
        "bool": (x > 0.5, "dtype"),
        "complex": (x.astype(np.complex64), "dtype"),
        "object": (x.astype(object), "dtype"),
        "strings": (np.full(x.shape, "a"), "dtype"),
        "a list": (x.tolist(), "numpy array"),
        "None": (None, "numpy array"),
        "NaN": (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32), "NaN"),
        "Inf": (np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x).astype(np.float32), "Inf"),
        "-Inf": (np.where(np.arange(x.size).reshape(x.shape) == 7, -np.inf, x).astype(np.float32), "Inf"),
        "0..255 floats": (x * 255, "[0, 1]"),
        "negative": (x - 0.5, "[0, 1]"),
        "empty": (x[:0], "empty"),
    }


@pytest.mark.parametrize("case", list(_bad_images(np.zeros((2, 1, 28, 28), np.float32))))
def test_bad_images_are_refused_everywhere(trainer, digits, case):
    x, y = digits
    bad, word = _bad_images(x)[case]
    yy = y[: len(bad)] if hasattr(bad, "__len__") and bad is not None and len(bad) <= len(y) else y
    refused(trainer, lambda: trainer.fit(bad, yy), word)
    refused(trainer, lambda: trainer.evaluate(bad, yy), word)
    refused(trainer, lambda: trainer.predict(bad), word)
    refused(trainer, lambda: trainer.predict_logits(bad), word)


# ---- labels ----------------------------------------------------------------------------------
def _bad_labels(y):
    return {
        "class 10 of 10": (np.where(np.arange(len(y)) == 3, 10, y), "class ids outside [0, 9]"),
        "negative class": (np.where(np.arange(len(y)) == 3, -1, y), "class ids outside [0, 9]"),
        "huge uint64": (np.where(np.arange(len(y)) == 3, 2**63 + 5, y.astype(np.uint64)).astype(np.uint64), "outside"),
        "float labels": (y.astype(np.float32), "integer"),
        "bool labels": (y > 4, "integer"),
        "string labels": (y.astype(str), "integer"),
        "one-hot": (np.eye(10, dtype=np.int64)[y], "1-D"),
        "a list": (y.tolist(), "numpy array"),
        "None": (None, "numpy array"),
        "too short": (y[:-1], "different lengths"),
        "too long": (np.concatenate([y, y[:1]]), "different lengths"),
        "empty": (y[:0], "different lengths"),
    }


@pytest.mark.parametrize("case", list(_bad_labels(np.zeros(4, np.int64))))
def test_bad_labels_are_refused(trainer, digits, case):
    x, y = digits
    bad, words = _bad_labels(y)[case]
    refused(trainer, lambda: trainer.fit(x, bad), words)
    refused(trainer, lambda: trainer.evaluate(x, bad), words)


def test_empty_data_is_refused(trainer, digits):
    x, y = digits
    refused(trainer, lambda: trainer.fit(x[:0], y[:0]), "empty")
    refused(trainer, lambda: trainer.evaluate(x[:0], y[:0]), "empty")
    refused(trainer, lambda: trainer.predict(x[:0]), "empty")


def test_batch_larger_than_the_data(trainer, digits):
    x, y = digits
    msg = refused(trainer, lambda: trainer.fit(x[: B - 1], y[: B - 1]), f"batches of {B}", f"only {B - 1}")
    assert "samples" in msg
    # evaluate and predict take any number of samples, even fewer than a batch
    assert trainer.predict(x[:1]).shape == (1,)
    assert trainer.evaluate(x[:3], y[:3])["n"] == 3


@pytest.mark.parametrize("kwargs,words", [
    ({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"epochs": 1.5}, "epochs"), ({"epochs": "2"}, "epochs"),
    ({"epochs": True}, "epochs"), ({"epochs": None}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"),
    ({"lr": "0.1"}, "lr"), ({"lr": True}, "lr"),
    ({"schedule": "linear"}, "schedule"), ({"schedule": None}, "schedule"), ({"schedule": ["cosine"]}, "schedule"),
    ({"seed": -1}, "seed"), ({"seed": 0.5}, "seed"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"checkpoint_every": 1.0}, "checkpoint_every"),
    ({"checkpoint": 123}, "checkpoint"),
])
def test_bad_fit_arguments(trainer, digits, kwargs, words):
    refused(trainer, lambda: trainer.fit(*digits, **kwargs), words)


def test_bad_predict_chunk(trainer, digits):
    refused(trainer, lambda: trainer.predict_logits(digits[0], chunk=0), "chunk")


def test_numpy_scalars_are_fine(bundle, digits):
    t = Trainer.load(bundle)
    r = t.fit(*digits, epochs=np.int64(1), lr=np.float32(0.05), seed=np.int32(3), checkpoint_every=np.uint8(0))
    assert r.steps == 4
    assert t.evaluate(digits[0], digits[1].astype(np.uint8))["n"] == 64
    assert t.predict(digits[0].astype(np.float64)).shape == (64,)


# ---- the device CLI --------------------------------------------------------------------------
def _run_many(commands: list[list]) -> list[subprocess.CompletedProcess]:
    """Run `python -m edgetl.runtime ...` commands concurrently."""
    procs = [subprocess.Popen([sys.executable, "-m", "edgetl.runtime", *map(str, c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.args, r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, (r.args, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    for w in words:
        assert w.lower() in lines[0].lower(), (r.args, w, lines[0])


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, digits):
    x, y = digits
    d = tmp_path_factory.mktemp("cli_data")
    files = {
        "good": dict(x_train=x, y_train=y, x_test=x, y_test=y),
        "uint8 images": dict(x_train=(x * 255).astype(np.uint8), y_train=y, x_test=x, y_test=y),
        "NaN images": dict(x_train=np.where(x > 0.5, np.nan, x), y_train=y, x_test=x, y_test=y),
        "wrong shape": dict(x_train=x[:, :, :20], y_train=y, x_test=x, y_test=y),
        "labels out of range": dict(x_train=x, y_train=y + 10, x_test=x, y_test=y),
        "float labels": dict(x_train=x, y_train=y.astype(np.float32), x_test=x, y_test=y),
        "mismatched lengths": dict(x_train=x, y_train=y[:-3], x_test=x, y_test=y),
        "too few samples": dict(x_train=x[:5], y_train=y[:5], x_test=x, y_test=y),
        "empty": dict(x_train=x[:0], y_train=y[:0], x_test=x, y_test=y),
        "missing keys": dict(x_train=x, y_train=y),
        "pickled labels": dict(x_train=x, y_train=y.astype(object), x_test=x, y_test=y),
        "NaN test images": dict(x_train=x, y_train=y, x_test=np.where(x > 0.5, np.nan, x), y_test=y),
        "test labels out of range": dict(x_train=x, y_train=y, x_test=x, y_test=y - 1),
    }
    out = {}
    for i, (name, arrays) in enumerate(files.items()):
        out[name] = d / f"case{i}.npz"
        np.savez(out[name], **arrays)
    out["a pickle"] = d / "pickle.npz"
    out["a pickle"].write_bytes(pickle.dumps({"x_train": x}))
    out["missing file"] = d / "nope.npz"
    return out


CLI_DATA_CASES = {
    "uint8 images": "dtype", "NaN images": "NaN", "wrong shape": "shape", "labels out of range": "class ids",
    "float labels": "integer", "mismatched lengths": "lengths", "too few samples": "batches of 16",
    "empty": "empty", "missing keys": "lacks", "pickled labels": "pickled", "a pickle": "not an .npz",
    "missing file": "does not exist", "NaN test images": "x_test contains NaN",
    "test labels out of range": "y_test has class ids outside",
}


def test_cli_refuses_bad_data_with_one_line(bundle, data_files):
    names = list(CLI_DATA_CASES)
    runs = _run_many([["fit", bundle, "--data", data_files[n], "--no-progress", "--json"] for n in names])
    for name, r in zip(names, runs):
        _one_line_error(r, CLI_DATA_CASES[name])


def test_cli_refuses_bad_arguments_with_one_line(bundle, data_files, tmp_path):
    good = data_files["good"]
    (tmp_path / "file").write_text("x")
    cases = [
        (["fit", bundle, "--data", good, "--epochs", "zero"], "--epochs"),
        (["fit", bundle, "--data", good, "--epochs", "0"], "epochs"),
        (["fit", bundle, "--data", good, "--lr", "-1"], "lr"),
        (["fit", bundle, "--data", good, "--lr", "nan"], "lr"),
        (["fit", bundle, "--data", good, "--schedule", "linear"], "--schedule"),
        (["fit", bundle, "--data", good, "--checkpoint-every", "-2"], "checkpoint_every"),
        (["fit", bundle, "--data", good, "--bogus"], "unrecognized"),
        (["fit", bundle], "--data"),
        (["fit", tmp_path / "no_bundle", "--data", good], "does not exist"),
        (["fit", bundle, "--data", good, "--no-progress", "--checkpoint", tmp_path / "file" / "ck.npz"], "checkpoint"),
        (["evaluate", bundle, "--data", data_files["labels out of range"], "--split", "train"], "class ids"),
        (["evaluate", bundle, "--data", good, "--checkpoint", tmp_path / "nope.npz"], "does not exist"),
        (["evaluate", bundle, "--data", good, "--checkpoint", good], "not an edgetl checkpoint"),
        # the message names what is in the way: the file where a directory should be
        (["export-inference", bundle, "--out", tmp_path / "file" / "model.onnx"], str(tmp_path / "file") + "'"),
        (["nonsense"], "invalid choice"),
    ]
    for (args, word), r in zip(cases, _run_many([a for a, _ in cases])):
        _one_line_error(r, word)
