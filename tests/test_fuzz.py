"""Property-based fuzzing of the bundle (manifest) and checkpoint loaders: thousands of mutated
files (byte flips, truncations, insertions; JSON mutations of manifest and checkpoint-header
fields: types, missing keys, huge numbers, NaN, hostile paths; arrays of other dtypes and shapes
under a recomputed checksum). The only exceptions allowed are edgetl's own clear errors
(BundleError / CheckpointError / EdgeRuntimeError); a rejected checkpoint leaves the trainer as
it was. Each test prints how many inputs it tried and what became of them."""
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edgetl
from edgetl.exporters import export
from edgetl.runtime import BundleError, CheckpointError, EdgeRuntimeError, Trainer, load_bundle
from edgetl.runtime import checkpoint as ckpt
from edgetl.runtime import safetensors
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
# EDGETL_FUZZ_SCALE=10 for a deeper run than CI's (~15-20 s in all at 1).
SCALE = float(os.environ.get("EDGETL_FUZZ_SCALE", "1"))
HUGE_INT = "@@HUGE_INT@@"  # replaced in the JSON text: Python's json refuses to write such an int
DEEP = "@@DEEP@@"  # a deeply nested array, past the parser's recursion limit


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    return export(pm, "onnx", tmp_path_factory.mktemp("fuzz") / "bundle", opt, batch_size=16)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Where the mutated files go: a tmpfs if there is one (rewriting a file thousands of times on
    ext4 costs ~1 ms a time in flushes), else the test's tmp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="edgetl-fuzz-", dir=shm))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def fuzz_bundle(bundle, scratch):
    """A copy of the bundle (its manifest is rewritten by each example), with hostile neighbours:
    a symlink leading out, a symlink loop, a file outside the directory."""
    root = scratch / "fuzz_bundle"
    root.mkdir()
    d = root / "b"
    shutil.copytree(bundle, d)
    shutil.copy(d / "eval.onnx", root / "outside.onnx")
    (d / "link_out").symlink_to(root / "outside.onnx")
    (d / "loop").symlink_to(d / "loop")
    (d / "subdir").mkdir()
    _write_sealed(d, json.loads((d / "manifest.json").read_bytes()))
    return d, (d / "manifest.json").read_bytes()


def _seal(m):
    """The manifest with its own checksum (the exporter should write one: see runtime/bundle.py)."""
    if isinstance(m, dict):
        m = {**m, MANIFEST_DIGEST: manifest_digest(m)}
    return m


def _write_sealed(d, m) -> None:
    (d / "manifest.json").write_bytes(_dumps(_seal(m)))


@pytest.fixture(scope="module", autouse=True)
def cached_sha256():
    """The bundle's files never change during these tests: hash each once (the manifest parser
    and validator are what is fuzzed here, not hashlib)."""
    from edgetl.runtime import bundle as bundle_module

    real, cache = bundle_module.sha256, {}

    def cached(path):
        st_ = os.stat(path)
        key = (str(path), st_.st_ino, st_.st_size, st_.st_mtime_ns)
        if key not in cache:
            cache[key] = real(path)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bundle_module, "sha256", cached)
        yield


@pytest.fixture(scope="module")
def report():
    counts = collections.defaultdict(collections.Counter)
    t0 = time.perf_counter()
    yield counts
    total = sum(sum(c.values()) for c in counts.values())
    lines = [f"  {name}: {sum(c.values())} inputs ({', '.join(f'{k} {v}' for k, v in c.most_common())})"
             for name, c in counts.items()]
    print(f"\nfuzz: {total} mutated inputs in {time.perf_counter() - t0:.1f} s\n" + "\n".join(lines))


# ---- mutation strategies ---------------------------------------------------------------------
PATHS = ["../outside.onnx", "/etc/passwd", "..", ".", "", "a\x00b", "state.safetensors", "eval.onnx", "manifest.json",
         "sub/../../outside.onnx", "x" * 5000, "loop", "link_out", "subdir", "./eval.onnx", "eval.onnx/",
         "~/x", "C:\\evil", "\u00e9\u4e2d"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 10, 15, 16, 17, 28, 32, 2**31, 2**63, 1.0, 0.5, -0.0, 1e308, HUGE_INT, DEEP]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(PATHS),
    st.sampled_from(["a" * 64, "0" * 64, "f" * 63, "onnx", "ort-training", "executorch", "sgd", "float32"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3),
                   st.lists(st.lists(scalars, max_size=2), max_size=2))


def _paths(node, prefix=()):
    """Every location in a JSON document, as a tuple of keys/indices."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _dumps(doc) -> bytes:
    text = json.dumps(doc)
    text = text.replace(f'"{HUGE_INT}"', "9" * 5000).replace(f'"{DEEP}"', "[" * 50000 + "]" * 50000)
    return text.encode()


@st.composite
def json_mutation(draw, doc, paths):
    """`doc` (deep-copied) with 1-3 structural mutations at some of `paths` (its locations)."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "stringify", "wrap"]))
        if not where:
            if op == "replace":
                doc = draw(values)
            continue
        parent = doc
        try:
            for k in where[:-1]:
                parent = parent[k]
            key = where[-1]
            if not isinstance(parent, (dict, list)):
                continue
            current = parent[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation changed the structure
        if op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(current, dict):
            current[draw(st.text(max_size=8) | st.sampled_from(PATHS))] = draw(values)
        elif op == "add" and isinstance(current, list):
            current.insert(draw(st.integers(0, len(current))), draw(values))
        elif op == "stringify":
            parent[key] = json.dumps(current)
        elif op == "wrap":
            parent[key] = [current]
    return doc


@st.composite
def byte_mutation(draw, data: bytes):
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "overwrite"]))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i : i + draw(st.integers(1, 64))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            b[i : i + len(chunk)] = chunk
    return bytes(b)


# ---- bundles ---------------------------------------------------------------------------------
def _exercise_bundle(d, counts, unchanged_from=None) -> None:
    """load_bundle and everything a backend reads from the result: BundleError or a sound bundle
    (and, if `unchanged_from` is given, one whose manifest says exactly that)."""
    try:
        b = load_bundle(d)
        state = b.initial_state()
        assert set(state) == set(b.trainable) | set(b.state_names)
        assert b.batch_size >= 1 and len(b.input_shape) == 3 and b.num_classes >= 1
        for role in b.manifest["programs"]:
            assert b.program(role).is_file()
        if unchanged_from is not None and MANIFEST_DIGEST in b.manifest:
            # (a manifest without its checksum is still read, as exporters write none yet)
            assert b.manifest == unchanged_from, "an altered manifest passed its own checksum"
    except BundleError as e:
        assert str(e) and "\n" not in str(e)
        counts["refused (BundleError)"] += 1
        return
    counts["accepted"] += 1


def test_fuzz_manifest_bytes(fuzz_bundle, report):
    d, original = fuzz_bundle
    counts = report["manifest bytes"]
    doc = json.loads(original)

    @settings(FUZZ, max_examples=examples(2000))
    @given(st.data())
    def run(data):
        (d / "manifest.json").write_bytes(data.draw(byte_mutation(original)))
        _exercise_bundle(d, counts, unchanged_from=doc)

    run()
    (d / "manifest.json").write_bytes(original)
    assert sum(counts.values()) >= examples(2000) * 0.9


def test_fuzz_manifest_json(fuzz_bundle, report):
    d, original = fuzz_bundle
    counts = report["manifest JSON fields"]
    doc = json.loads(original)
    paths = _paths(doc)

    @settings(FUZZ, max_examples=examples(2500))
    @given(st.data())
    def run(data):
        m = data.draw(json_mutation(doc, paths))
        if data.draw(st.booleans()):  # a well-formed manifest with wrong values: the validator's job
            (d / "manifest.json").write_bytes(_dumps(_seal(m)))
            _exercise_bundle(d, counts)
        else:  # its own checksum must catch any change, unless the mutation removed the checksum
            # (optional while exporters write none; see runtime/bundle.py)
            (d / "manifest.json").write_bytes(_dumps(m))
            _exercise_bundle(d, counts, unchanged_from=doc)

    run()
    (d / "manifest.json").write_bytes(original)
    assert sum(counts.values()) >= examples(2500) * 0.9 and counts["refused (BundleError)"] > examples(2500) / 2


# Fields whose values a backend acts on: a manifest that passes load_bundle with a mutation here
# must still fail cleanly (or work) when a Trainer loads it, predicts and takes a step.
SEMANTIC = [("input", "batch_size"), ("input", "shape", 0), ("input", "shape", 1), ("input", "preprocess", "mean", 0),
            ("num_classes",), ("trainable", 0, "shape", 0), ("trainable", 4, "name"), ("optimizer", "lr"),
            ("optimizer", "state", 1, "shape"), ("io", "params", "head.bias"), ("io", "state", "momentum:head.bias"),
            ("state_keys", "head.bias"), ("programs", "eval"), ("programs", "train_step"), ("target",)]


def test_fuzz_manifest_into_the_trainer(fuzz_bundle, report):
    d, original = fuzz_bundle
    counts = report["manifest fields, through Trainer"]
    doc = json.loads(original)
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    y = np.arange(16) % 10
    near = st.sampled_from([0, 1, 2, 3, 9, 11, 15, 17, 28, 29, 0.5, "16", "eval.onnx", "train_step.onnx", "state.safetensors",
                            "param.0", "param.5", "state.0", "a0", "a5", "head.weight", "ort-training", "executorch",
                            [10], [10, 256], [], None])

    @settings(FUZZ, max_examples=examples(80))
    @given(st.sampled_from(SEMANTIC), near)
    # the case: a 10-class program resealed as 20 classes trained at loss 0, then crashed
    @example(("num_classes",), 11)
    @example(("io", "params", "head.bias"), "param.4")
    def run(where, value):
        m = json.loads(original)
        node = m
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value
        _write_sealed(d, m)
        try:
            t = Trainer.load(d)
            logits = t.predict_logits(x[:3])
            r = t.fit(x, y, epochs=1)
            ev = t.evaluate(x, y)
        except EdgeRuntimeError as e:
            assert str(e) and "\n" not in str(e)
            counts[f"refused ({type(e).__name__})"] += 1
            return
        # accepted: then the trainer does what the (mutated) manifest says, and works
        assert logits.shape == (3, m["num_classes"]), (where, value, logits.shape)
        assert r.steps == len(x) // m["input"]["batch_size"] and all(np.isfinite(r.losses)), (where, value)
        assert {k: v.shape for k, v in t.backend.get_state().items()} == t.bundle.tensor_shapes(), (where, value)
        assert t.schedule["lr"] == m["optimizer"]["lr"] and ev["n"] == len(x) and np.isfinite(ev["loss"])
        counts["accepted"] += 1

    run()
    (d / "manifest.json").write_bytes(original)
    assert doc == json.loads(original)
    assert sum(counts.values()) >= min(examples(80), len(SEMANTIC) * 27) * 0.7


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory):
    """A trainer 4 steps in, its checkpoint's bytes, and its state."""
    t = Trainer.load(bundle)
    g = np.random.default_rng(1)
    t.fit(g.random((64, 1, 28, 28), dtype=np.float32), np.arange(64) % 10, epochs=1, lr=0.05)
    path = tmp_path_factory.mktemp("fuzz_ckpt") / "model.ckpt"
    t.save_checkpoint(path)
    return t, path, path.read_bytes(), {k: v.copy() for k, v in t.backend.get_state().items()}


def _load_into(t, path, base_state, counts, unchanged=False) -> None:
    """Load a (mutated) checkpoint into `t`: a CheckpointError leaves t exactly as it was; with
    `unchanged`, a checkpoint that loads must hold exactly the base state and header."""
    step, epoch, schedule = t.step, t.epoch, dict(t.schedule)
    try:
        t.load_checkpoint(path)
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)
        assert (t.step, t.epoch, t.schedule) == (step, epoch, schedule)
        now = t.backend.get_state()
        assert all(np.array_equal(now[k], v) for k, v in base_state.items())
        counts["refused (CheckpointError)"] += 1
        return
    counts["accepted"] += 1
    assert isinstance(t.step, int) and t.step >= 0 and t.lr_at(t.step) > 0
    now = t.backend.get_state()
    assert set(now) == set(base_state) and all(np.isfinite(v).all() for v in now.values())
    if unchanged:
        assert (t.step, t.epoch, t.schedule) == (step, epoch, schedule)
        assert all(np.array_equal(now[k], v) for k, v in base_state.items())
    t.step, t.epoch, t.schedule = step, epoch, schedule  # back to the base for the next example
    t.backend.set_state(base_state)


def test_fuzz_checkpoint_bytes(trained, scratch, report):
    t, path, original, base = trained
    counts = report["checkpoint bytes"]
    target = scratch / "bytes.ckpt"

    @settings(FUZZ, max_examples=examples(2000))
    @given(st.data())
    def run(data):
        target.write_bytes(data.draw(byte_mutation(original)))
        _load_into(t, target, base, counts, unchanged=True)

    run()
    assert sum(counts.values()) >= examples(2000) * 0.9


def _resave(path, arrays: dict, metadata, fix_digest: bool = True, dtypes: dict | None = None) -> None:
    """A safetensors checkpoint of `arrays` whose `__metadata__` is `metadata` as given (any JSON
    value), its checksum recomputed where `fix_digest` and it can be, and the tensor table's dtype
    tags replaced by `dtypes`."""
    plain = safetensors.encode(arrays)
    n = int.from_bytes(plain[:8], "little")
    table, data = json.loads(plain[8 : 8 + n]), plain[8 + n :]
    if fix_digest and isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()):
        entries = safetensors.read_header(plain)[0]
        metadata = {**metadata, "sha256": ckpt.digest(metadata, entries, data)}
    for name, tag in (dtypes or {}).items():
        table[name]["dtype"] = tag
    text = _dumps({"__metadata__": metadata, **table})
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _as_strings(h):
    """A (mutated) decoded header as __metadata__ strings, as the writer stores them."""
    if not isinstance(h, dict):
        return h
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in h.items()}


def test_fuzz_checkpoint_header(trained, scratch, report):
    """Header fields mutated; half the time the checksum is recomputed to match (a well-formed
    but wrong header), so that the field checks themselves are exercised."""
    t, path, original, base = trained
    counts = report["checkpoint header fields"]
    target = scratch / "header.ckpt"
    files, header = ckpt.load_checkpoint(path)
    paths = _paths(header)

    @settings(FUZZ, max_examples=examples(1500))
    @given(st.data())
    def run(data):
        h = data.draw(json_mutation(header, paths))
        try:
            _resave(target, files, _as_strings(h), fix_digest=data.draw(st.booleans()))
        except (ValueError, TypeError):  # a value json cannot write
            return
        _load_into(t, target, base, counts)

    run()
    assert sum(counts.values()) >= examples(1500) * 0.9


def test_fuzz_checkpoint_arrays(trained, scratch, report):
    """Arrays of other dtypes, shapes or values, extra or missing arrays, under a correct checksum."""
    t, path, original, base = trained
    counts = report["checkpoint arrays"]
    target = scratch / "arrays.ckpt"
    files, metadata = safetensors.decode(path.read_bytes())
    names = sorted(files)
    kinds = ["float64", "float16", "int32", "uint8", "bool", "C64", "BF16", "reshape", "extra dim", "scalar",
             "empty", "nan", "inf", "remove", "extra array"]

    @settings(FUZZ, max_examples=examples(600))
    @given(st.sampled_from(names), st.sampled_from(kinds))
    def run(key, how):
        arrays = dict(files)
        a = arrays[key]
        dtypes = None
        if how == "reshape":
            arrays[key] = a.reshape(-1)[::-1].reshape(-1, 1) if a.size > 1 else a.reshape(1, 1)
        elif how == "extra dim":
            arrays[key] = a[None]
        elif how == "scalar":
            arrays[key] = np.float32(1.5)
        elif how == "empty":
            arrays[key] = np.zeros((0,), np.float32)
        elif how in ("nan", "inf"):
            arrays[key] = np.where(np.arange(a.size).reshape(a.shape) == 0, float(how), a).astype(a.dtype)
        elif how == "remove":
            del arrays[key]
        elif how == "extra array":
            arrays["an extra tensor"] = a
        elif how in ("C64", "BF16"):  # dtypes safetensors names but this runtime does not read
            dtypes = {key: how}
        else:
            arrays[key] = a.astype(how)
        _resave(target, arrays, {k: v for k, v in metadata.items() if k != "sha256"}, dtypes=dtypes)
        _load_into(t, target, base, counts)

    run()
    # hypothesis stops once it has tried every (array, kind) pair
    assert sum(counts.values()) >= min(examples(600), len(names) * len(kinds)) * 0.9
    assert counts["refused (CheckpointError)"] > counts["accepted"]
