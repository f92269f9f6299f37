"""The bundle contract is stated once, in runtime/contract.json (runtime/targets.py builds the
TargetSpec registry from it; the JS runtime's src/contract.js is generated from it), and read by
everyone: the manifest validator refuses what the registry does not describe, every exporter's
bundle matches its target's spec, the command lines offer the registry's targets, and BUNDLE.md's
tables are the registry's (so the document cannot drift from the code)."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgetl
from edgetl.cli import build_parser
from edgetl.exporters import export
from edgetl.runtime import BundleError, Trainer, load_bundle
from edgetl.runtime import targets
from edgetl.runtime.bundle import FORMAT_VERSION, MANIFEST_DIGEST, manifest_digest, sha256
from edgetl.runtime.onnx_proto import summarize
from edgetl.runtime.programs import program_names
from edgetl.runtime.targets import TARGETS, ProgramSpec, io_maps

ROOT = Path(__file__).resolve().parents[1]
B = 8


class _Bundles(dict):
    """One small bundle per target, exported on first use."""

    def __init__(self, root):
        super().__init__()
        self.root, self.pm = root, edgetl.prepare("mnist_cnn", "bias", num_classes=10)

    def __missing__(self, target):
        opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9 if TARGETS[target].sgd_momentum else 0.0)
        self[target] = export(self.pm, target, self.root / target, opt, batch_size=B)
        return self[target]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return _Bundles(tmp_path_factory.mktemp("targets"))


def _copy(bundles, target, tmp_path) -> Path:
    d = tmp_path / target
    shutil.copytree(bundles[target], d)
    return d


def _reseal(d: Path, change=lambda m: None) -> None:
    m = json.loads((d / "manifest.json").read_bytes())
    change(m)
    m["files"] = {rel: sha256(d / rel) for rel in m["files"]}
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _refused(d: Path, *words: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(d)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---- every exporter's bundle is its spec --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_exporter_writes_its_spec(bundles, target):
    spec = TARGETS[target]
    b = load_bundle(bundles[target])
    m = b.manifest
    assert b.spec is spec
    assert m["programs"] == spec.program_files()
    assert set(spec.files) <= set(m["files"])
    assert m["io"] == io_maps(spec, b.trainable, b.state_names)
    assert bool(b.state_names) == spec.state_in_program  # sgd with momentum has state; ORT keeps its own
    params, state = program_names(m)
    assert params == [targets.param_name(i) for i in range(len(b.trainable))]
    if spec.program_format == "onnx":  # the names in the programs are the spec's, in its order
        for p in spec.programs:
            if p.opaque:
                continue
            s = summarize((b.root / p.file).read_bytes())
            got = [v.name for v in s.inputs if v.name not in s.initializers]
            want = p.input_names(params, state)
            # (ORT's own inputs, frozen weights and gradient buffers, come among the spec's)
            assert ([g for g in got if g in want] if p.more_inputs else got) == want, p.role
            outs = [v.name for v in s.outputs]
            assert [o for o, w in zip(outs, p.output_names(params, state)) if w != targets.LOSS] == \
                [w for w in p.output_names(params, state) if w != targets.LOSS], p.role
    # and it runs, with its programs checked against the spec (ExecuTorch's once loaded)
    t = Trainer.load(bundles[target])
    x = np.random.default_rng(0).random((B, 1, 28, 28), dtype=np.float32)
    assert t.fit(x, np.arange(B) % 10, epochs=1).steps == 1


# ---- the registry drives validation -----------------------------------------------------------
def test_an_unknown_target_is_refused(bundles, tmp_path):
    d = _copy(bundles, "onnx", tmp_path)
    _reseal(d, lambda m: m.update(target="tflite"))
    msg = _refused(d, "unknown target 'tflite'")
    assert all(name in msg for name in TARGETS)


def _rename_input(path: Path, old: str, new: str) -> None:
    model = onnx.load(path)
    for v in model.graph.input:
        if v.name == old:
            v.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    onnx.save(model, path)


@pytest.mark.parametrize("target,role,name", [("onnx", "train_step", "lr"), ("onnx", "train_step", "y"),
                                              ("onnx", "eval", "param.3"), ("ort-training", "training", "labels")])
def test_a_program_lacking_an_input_of_its_spec_is_refused(bundles, tmp_path, target, role, name):
    d = _copy(bundles, target, tmp_path)
    _rename_input(d / TARGETS[target].program(role).file, name, "renamed")
    _reseal(d)
    _refused(d, f"'{role}' program", repr(name))


def test_a_program_with_an_input_its_spec_lacks_is_refused(bundles, tmp_path):
    d = _copy(bundles, "onnx", tmp_path)
    path = d / "train_step.onnx"
    model = onnx.load(path)
    model.graph.input.append(onnx.helper.make_tensor_value_info("temperature", onnx.TensorProto.FLOAT, []))
    onnx.save(model, path)
    _reseal(d)
    _refused(d, "'train_step' program", "'temperature'")


def test_the_validator_reads_the_registry(bundles, tmp_path, monkeypatch):
    """A program or file the registry adds to a target is required of its bundles at once."""
    d = bundles["onnx"]
    onnx_spec = TARGETS["onnx"]
    monkeypatch.setitem(TARGETS, "onnx", dataclasses.replace(
        onnx_spec, programs=onnx_spec.programs + (ProgramSpec("predict", "predict.onnx", opaque=True),)))
    _refused(d, "needs the program(s) predict")
    monkeypatch.setitem(TARGETS, "onnx", dataclasses.replace(onnx_spec, files=("vocabulary.txt",)))
    _refused(d, "'vocabulary.txt' has no checksum")
    monkeypatch.setitem(TARGETS, "onnx", onnx_spec)
    load_bundle(d)


def test_state_where_the_spec_keeps_none_is_refused(bundles, tmp_path):
    d = _copy(bundles, "ort-training", tmp_path)
    _reseal(d, lambda m: m["optimizer"].update(state=[{"name": "momentum:head.bias", "shape": [10]}]))
    _refused(d, "optimizer.state", "must be empty")


def test_a_parameter_on_a_name_of_the_spec_is_refused(bundles, tmp_path):
    d = _copy(bundles, "onnx", tmp_path)
    _reseal(d, lambda m: m["io"]["params"].update({"head.bias": "x"}))
    _refused(d, "'head.bias'", "'x'", "names another of the program's tensors")


@pytest.mark.slow
def test_positional_io_must_follow_the_spec(bundles, tmp_path):
    """ExecuTorch programs bind by position: `io` names in another order are refused; the `io`
    of bundles exported before the io maps (a list per program, `param:NAME`) still loads."""
    d = _copy(bundles, "executorch", tmp_path)

    def swap(m):
        p = m["io"]["params"]
        p["head.bias"], p["head.weight"] = p["head.weight"], p["head.bias"]
    _reseal(d, swap)
    _refused(d, "'io.params'", "by position")

    def listed(m, order=lambda names: names):
        trainable = [t["name"] for t in m["trainable"]]
        state = [t["name"] for t in m["optimizer"]["state"]]
        m["io"] = {"train_step": {"inputs": ["x", "y", "lr", *(f"param:{t}" for t in order(trainable)),
                                             *(f"state:{s}" for s in state)]},
                   "eval": {"inputs": ["x", *(f"param:{t}" for t in trainable)]}}
    _reseal(d, listed)
    assert Trainer.load(d).fit(np.zeros((B, 1, 28, 28), np.float32), np.zeros(B, np.int64), epochs=1).steps == 1
    _reseal(d, lambda m: listed(m, order=lambda names: names[::-1]))
    _refused(d, "'io.train_step.inputs'")


# ---- the command lines offer the registry's targets ------------------------------------------
def test_the_host_cli_offers_the_registry(capsys):
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]
    action = next(a for a in export_parser._actions if a.dest == "target")
    assert tuple(action.choices) == tuple(TARGETS)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["export", "mnist_cnn", "--recipe", "bias", "--num-classes", "3",
                                   "--target", "tflite", "--out", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in TARGETS)


def test_the_device_cli_names_the_registry():
    from edgetl.runtime.__main__ import build_parser as device_parser

    text = device_parser().format_help()
    assert all(f"{t.name}:" in " ".join(text.split()) for t in TARGETS.values())


# ---- BUNDLE.md is the registry's --------------------------------------------------------------
def _cells(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def target_rows() -> list[str]:
    rows = []
    for t in TARGETS.values():
        files = _cells(t.files) if t.files else "—"
        rows.append(f"| `{t.name}` | {t.program_format} | {_cells(t.roles)} | {files} | by {t.bind} | "
                    f"{t.optimizer_state} | {'yes' if t.micro_batches else 'no'} |")
    return rows


def signature_rows() -> list[str]:
    rows = []
    for t in TARGETS.values():
        for p in t.programs:
            if p.opaque:
                ins = outs = "ORT's own (not checked)"
            else:
                ins = _cells(p.inputs) + (", + ORT's own" if p.more_inputs else "")
                outs = _cells(p.outputs) + (", + ORT's own" if p.more_outputs else "")
            batch = "—" if p.opaque else ("`input.batch_size`" if p.static_batch else "any")
            rows.append(f"| `{t.name}` | `{p.role}` | `{p.file}` | {ins} | {outs} | {batch} |")
    return rows


def _table(text: str, marker: str) -> list[str]:
    m = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    assert m, f"BUNDLE.md lacks its {marker} table"
    return [line for line in m.group(1).splitlines() if line.startswith("| `")]


def test_bundle_md_tables_are_the_registry():
    text = (ROOT / "BUNDLE.md").read_text()
    assert _table(text, "targets") == target_rows()
    assert _table(text, "signatures") == signature_rows()


def test_bundle_md_states_the_format_version_it_describes():
    text = (ROOT / "BUNDLE.md").read_text()
    m = re.search(r"bundle format version (\d+)", text)
    assert m and int(m.group(1)) == FORMAT_VERSION
    assert "BUNDLE.md" in (ROOT / "README.md").read_text()


# ---- one source for both runtimes ---------------------------------------------------------------
def test_the_js_runtime_reads_the_same_contract_byte_for_byte():
    """runtime/js/src/contract.js is runtime/contract.json as runtime/js/scripts/contract.mjs writes it
    (JSON.stringify(contract, null, 2) under a fixed header), so the JS runtime's targets, names,
    formats and versions are the Python runtime's."""
    source = json.loads((ROOT / "runtime" / "contract.json").read_text(encoding="utf-8"))
    assert source == targets.CONTRACT
    assert [t["name"] for t in source["targets"]] == list(TARGETS)
    js = (ROOT / "runtime" / "js" / "src" / "contract.js").read_text(encoding="utf-8")
    header, sep, body = js.partition("export const CONTRACT = ")
    assert sep and header.startswith("// Generated from runtime/contract.json"), "contract.js is not the generated module"
    assert body == json.dumps(source, indent=2, ensure_ascii=False) + ";\n", \
        "runtime/js/src/contract.js differs from runtime/contract.json: run node runtime/js/scripts/contract.mjs"


def test_the_specs_and_formats_are_built_from_the_contract():
    from edgetl.runtime import checkpoint, signing, state
    from edgetl.runtime import bundle as bundle_mod

    c = targets.CONTRACT
    for t in c["targets"]:
        spec = TARGETS[t["name"]]
        assert spec.roles == tuple(p["role"] for p in t["programs"])
        assert [list(p.inputs) for p in spec.programs] == [p.get("inputs", []) for p in t["programs"]]
        assert spec.sgd_momentum is t["sgd_momentum"] and spec.optimizer_state == t["optimizer_state"]
    assert (bundle_mod.FORMAT, bundle_mod.FORMAT_VERSION, bundle_mod.MANIFEST) == \
        (c["bundle"]["format"], c["bundle"]["format_version"], c["bundle"]["manifest"])
    assert (checkpoint.FORMAT, checkpoint.VERSION, state.FILE, signing.SIGNATURE) == \
        (c["checkpoint"]["format"], c["checkpoint"]["version"], c["state"]["file"], c["signature"]["file"])
