"""A bundle's programs, checked before onnxruntime or ExecuTorch sees them (issue 14, items 5 and 7):

- ONNX external data is refused wherever a tensor keeps it (initializer, node attribute; a file
  inside the bundle, `../x`, an absolute path), even when someone with write access resealed
  every checksum: onnxruntime would read that file, and no checksum covers it;
- a manifest resealed to say something its programs do not (num_classes, batch size, input
  shape, parameter names and shapes) is refused at load, before any training."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgetl
from edgetl.exporters import export
from edgetl.runtime import BundleError, Trainer, load_bundle
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256
from edgetl.runtime.onnx_proto import summarize

B = 16


class _Bundles(dict):
    """Bundles of one prepared model, exported on first use (each target costs seconds)."""

    def __init__(self, root):
        super().__init__()
        self.root, self.pm = root, edgetl.prepare("mnist_cnn", "bias", num_classes=10)

    def __missing__(self, target):
        opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.0 if target == "ort-training" else 0.9)
        self[target] = export(self.pm, target, self.root / target, opt, batch_size=B)
        return self[target]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return _Bundles(tmp_path_factory.mktemp("programs"))


@pytest.fixture
def copy(bundles, tmp_path):
    def make(target="onnx"):
        d = tmp_path / "x" / target
        shutil.copytree(bundles[target], d)
        return d
    return make


def _reseal(d, change=lambda m: None) -> None:
    m = json.loads((d / "manifest.json").read_bytes())
    change(m)
    m["files"] = {rel: sha256(d / rel) for rel in m["files"]}
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _refused(d, *words) -> str:
    for load in (load_bundle, Trainer.load):
        with pytest.raises(BundleError) as info:
            load(d)
        msg = str(info.value)
        assert msg and "\n" not in msg
        for w in words:
            assert w.lower() in msg.lower(), (w, msg)
    return msg


# ---- the reader ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnx", "ort-training"])
def test_the_reader_sees_what_onnx_sees(bundles, target):
    m = json.loads((bundles[target] / "manifest.json").read_bytes())
    for rel in m["programs"].values():
        model = onnx.load(str(bundles[target] / rel))
        s = summarize((bundles[target] / rel).read_bytes())

        def dims(v):  # None: no tensor shape (e.g. the optimizer's sequence inputs)
            if not v.type.tensor_type.HasField("shape"):
                return None
            return tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)

        for ours, theirs in ((s.inputs, model.graph.input), (s.outputs, model.graph.output)):
            assert [(v.name, v.elem_type, v.shape) for v in ours] == \
                   [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in theirs]
        assert s.initializers == {t.name for t in model.graph.initializer} and s.external == ()


# ---- external data ---------------------------------------------------------------------------
def _externalize(path, location: str, where: str) -> None:
    """Move one float tensor of the program at `path` to the file `location` (relative to the
    program, or absolute), as onnx.save(..., save_as_external_data=True) would."""
    model = onnx.load(str(path))
    g = model.graph
    if where == "initializer":
        t = max(g.initializer, key=lambda t: len(t.raw_data))
    else:  # a Constant node's value attribute, inside the graph
        t = numpy_helper.from_array(np.ones(4, np.float32), "edgetl.const")
        g.node.insert(0, helper.make_node("Constant", [], ["edgetl.unused"], value=t))
        t = g.node[0].attribute[0].t
    target = path.parent / location  # an absolute `location` stays absolute
    target.write_bytes(t.raw_data)
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("where", ["initializer", "attribute"])
@pytest.mark.parametrize("location", ["weights.bin", "../outside.bin", "ABSOLUTE"])
def test_external_data_is_refused(copy, tmp_path, where, location):
    d = copy()
    if location == "ABSOLUTE":
        location = str(tmp_path / "absolute.bin")
    _externalize(d / "eval.onnx", location, where)
    _reseal(d)  # every checksum recomputed: only the external-data check can refuse this
    _refused(d, "external data", "eval")


def test_external_data_is_refused_by_data_location_alone(copy):
    d = copy("ort-training")
    model = onnx.load(str(d / "training_model.onnx"))
    model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    (d / "training_model.onnx").write_bytes(model.SerializeToString())
    _reseal(d)
    _refused(d, "external data", "training")


def test_an_unchecked_ort_checkpoint_sidecar_is_refused(copy):
    """onnxruntime reads an ORT checkpoint's external data from `checkpoint.data` beside it."""
    d = copy("ort-training")
    (d / "checkpoint.data").write_bytes(b"\0" * 64)
    _refused(d, "checkpoint.data", "no checksum")


def test_export_inference_of_external_data_is_one_line(copy, tmp_path):
    d = copy()
    _externalize(d / "eval.onnx", "weights.bin", "initializer")
    _reseal(d)
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "export-inference", str(d), "--out",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "external data" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("junk", [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05" + b"\x0a\x03abc"])
def test_a_program_that_is_not_protobuf_is_refused(copy, junk):
    d = copy()
    (d / "eval.onnx").write_bytes(junk)
    _reseal(d)
    _refused(d, "eval")


# ---- the manifest against the programs -------------------------------------------------------
def _set(path, value):
    def change(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return change


ONNX_LIES = {
    "num_classes 20 (the issue's case)": (("num_classes",), 20, "logits"),
    "num_classes 5": (("num_classes",), 5, "logits"),
    "batch size": (("input", "batch_size"), 8, "input images"),
    "input size": (("input", "shape"), [1, 32, 32], "input images"),
    "channels": (("input", "shape"), [3, 28, 28], "input images"),
    "a parameter's program name": (("io", "params", "head.bias"), "param.99", "param.99"),
    "two parameters on one input": (("io", "params", "head.bias"), "param.4", "same program input"),
    "two parameters swapped": (("io", "params"), "SWAP", "fc_layers.0.bias"),
}


@pytest.mark.parametrize("case", list(ONNX_LIES))
def test_onnx_manifest_must_match_its_programs(copy, case):
    path, value, word = ONNX_LIES[case]
    d = copy()
    change = _set(path, value)
    if value == "SWAP":
        def change(m):
            p = m["io"]["params"]
            p["head.bias"], p["fc_layers.0.bias"] = p["fc_layers.0.bias"], p["head.bias"]
    if path == ("input", "shape") and value[0] == 3:
        change = lambda m: (_set(path, value)(m), m["input"]["preprocess"].update(mean=[0.1] * 3, std=[0.3] * 3))
    _reseal(d, change)
    _refused(d, word)


# (ort-training programs take any batch size; the executorch target's checks are tested in
# test_executorch.py, on the bundles exported there)
@pytest.mark.parametrize("lie", ["num_classes", "input"])
def test_ort_training_manifest_must_match_its_programs(copy, lie):
    d = copy("ort-training")
    _reseal(d, {"num_classes": _set(("num_classes",), 20), "input": _set(("input", "shape"), [1, 32, 32])}[lie])
    _refused(d, "manifest", "'training' program")


def test_a_matching_manifest_trains(bundles):
    x = np.random.default_rng(0).random((B, 1, 28, 28), dtype=np.float32)
    for target in ("onnx", "ort-training"):
        t = Trainer.load(bundles[target])
        assert t.fit(x, np.arange(B) % 10, epochs=1).steps == 1, target


def test_a_program_replaced_after_its_checks_is_never_run(copy, tmp_path, monkeypatch):
    """A writer racing the runtime swaps a checked program for one whose tensor lives outside the
    bundle: between the checksum and the program check, between load and the runtime opening it,
    and before the inference export. Each is refused; the file outside is never needed."""
    import edgetl.runtime.bundle as bundle_mod
    from edgetl.runtime.backends import make_backend

    d = copy()
    evil = tmp_path / "evil.onnx"
    shutil.copy(d / "eval.onnx", evil)
    _externalize(evil, str(tmp_path / "outside.bin"), "initializer")
    good = (d / "eval.onnx").read_bytes()

    real_sha256 = bundle_mod.sha256

    def sha256_then_swap(path):
        digest = real_sha256(path)
        if path.name == "eval.onnx":
            (d / "eval.onnx").write_bytes(evil.read_bytes())
        return digest

    monkeypatch.setattr(bundle_mod, "sha256", sha256_then_swap)
    with pytest.raises(BundleError, match="eval.*sha256"):
        load_bundle(d)
    monkeypatch.undo()

    (d / "eval.onnx").write_bytes(good)
    b = load_bundle(d)
    t = Trainer.load(d)
    (d / "eval.onnx").write_bytes(evil.read_bytes())
    with pytest.raises(BundleError, match="eval.*sha256"):
        make_backend(b)
    with pytest.raises(BundleError, match="eval.*sha256"):
        t.export_inference(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
