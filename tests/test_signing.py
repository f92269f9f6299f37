"""Signed bundles (issue 14, item 6): `edgetl keygen` writes an Ed25519 key pair, `export(...,
sign_key=)` / `edgetl export --sign-key` signs the manifest, and a runtime given a trusted key
(`trusted_key=`, `--trusted-key`, or $EDGETL_TRUSTED_KEY) loads only bundles signed by it: an
unsigned bundle, one signed by another key, and one altered after signing (even with every
sha256 recomputed) are refused with a BundleError that says why."""
import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

import edgetl
from edgetl.cli import main as host_main
from edgetl.exporters import export
from edgetl.runtime import BundleError, EdgeRuntimeError, Trainer, load_bundle
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256
from edgetl.runtime.signing import TRUSTED_KEY_ENV, SigningKeyError, generate_keypair


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert host_main(["keygen", "--out", str(d / "k")]) == 0
    other = generate_keypair(d / "other")
    return {"key": d / "k" / "edgetl-signing.key", "pub": d / "k" / "edgetl-signing.pub", "other_pub": other[1]}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    return export(pm, "onnx", tmp_path_factory.mktemp("signed") / "bundle", opt, batch_size=16,
                  sign_key=keys["key"])


@pytest.fixture
def copy(signed, tmp_path):
    d = tmp_path / "bundle"
    shutil.copytree(signed, d)
    return d


@pytest.fixture(autouse=True)
def no_configured_key(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEY_ENV, raising=False)


def _reseal(d, change) -> None:
    """What someone who can write the bundle can do: change the manifest and recompute every
    checksum (files and the manifest's own)."""
    m = json.loads((d / "manifest.json").read_bytes())
    change(m)
    m["files"] = {rel: sha256(d / rel) for rel in m["files"]}
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _refused(d, key, *words) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(d, trusted_key=key)
    msg = str(info.value)
    assert msg and "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def test_keygen_writes_a_private_key_only_its_owner_reads(keys, tmp_path):
    assert stat.S_IMODE(os.stat(keys["key"]).st_mode) == 0o600
    assert keys["key"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert keys["pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(keys["key"].parent)
    old = os.umask(0)  # even under a permissive umask
    try:
        priv, _ = generate_keypair(tmp_path / "loose")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600


def test_a_signed_bundle_loads_with_its_key(signed, keys, monkeypatch):
    sig = json.loads((signed / "manifest.sig").read_text())
    assert sig["algorithm"] == "ed25519" and sig["signed_file"] == "manifest.json"
    assert len(base64.b64decode(sig["signature"])) == 64
    assert load_bundle(signed, trusted_key=keys["pub"]).target == "onnx"
    t = Trainer.load(signed, trusted_key=str(keys["pub"]))
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    t.fit(x, np.arange(16) % 10, epochs=1)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["pub"]))
    assert load_bundle(signed).target == "onnx"
    assert load_bundle(signed, trusted_key=keys["pub"]).target == "onnx"


def test_without_a_trusted_key_signing_is_optional(signed, copy):
    assert load_bundle(signed).target == "onnx"
    (copy / "manifest.sig").unlink()
    assert load_bundle(copy).target == "onnx"


def test_an_unsigned_bundle_is_refused(copy, keys, monkeypatch):
    (copy / "manifest.sig").unlink()
    _refused(copy, keys["pub"], "not signed")
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["pub"]))  # a configured key
    _refused(copy, None, "not signed")
    with pytest.raises(BundleError, match="not signed"):
        Trainer.load(copy)


def test_a_bundle_signed_by_another_key_is_refused(copy, keys):
    _refused(copy, keys["other_pub"], "another key")


@pytest.mark.parametrize("change", ["manifest value", "program and every checksum", "signature swapped"])
def test_a_bundle_altered_after_signing_is_refused(copy, keys, signed, tmp_path, change):
    if change == "manifest value":
        _reseal(copy, lambda m: m["optimizer"].update(lr=5.0))
    elif change == "program and every checksum":
        import onnx

        model = onnx.load(str(copy / "train_step.onnx"))
        model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
        onnx.save(model, str(copy / "train_step.onnx"))
        _reseal(copy, lambda m: None)
    else:  # a valid signature, of another manifest, by the same key
        other = tmp_path / "other"
        shutil.copytree(signed, other)
        _reseal(other, lambda m: m["optimizer"].update(lr=5.0))
        shutil.copy(copy / "manifest.sig", other / "manifest.sig")
        copy = other
    assert load_bundle(copy).target == "onnx"  # intact: without a key, nothing notices
    _refused(copy, keys["pub"], "altered after signing")


@pytest.mark.parametrize("sig", [b"", b"{}", b"not json", b"\xff" * 64, b"x" * 100_000])
def test_a_malformed_signature_file_is_refused(copy, keys, sig):
    (copy / "manifest.sig").write_bytes(sig)
    _refused(copy, keys["pub"], "signature")


def test_a_bad_trusted_key_is_a_clear_error(signed, keys, tmp_path):
    (tmp_path / "junk.pub").write_text("junk")
    for key, words in [(keys["key"], "not a pem public key"), (tmp_path / "junk.pub", "not a pem public key"),
                       (tmp_path / "missing.pub", "does not exist"), (42, "path")]:
        with pytest.raises(EdgeRuntimeError) as info:
            load_bundle(signed, trusted_key=key)
        assert words in str(info.value).lower() and "\n" not in str(info.value)


def test_export_refuses_a_bad_signing_key_before_exporting(keys, tmp_path, capsys):
    out = tmp_path / "b"
    rc = host_main(["export", "mnist_cnn", "--recipe", "bias", "--num-classes", "10", "--target", "onnx",
                    "--out", str(out), "--sign-key", str(keys["pub"])])
    err = capsys.readouterr().err
    assert rc == 2 and "not an unencrypted PEM private key" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_device_cli_refuses_unsigned_bundles(copy, keys, tmp_path):
    x = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    y = np.arange(32) % 10
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    (copy / "manifest.sig").unlink()
    key = str(keys["pub"])
    commands = [["fit", copy, "--data", data, "--no-progress", "--trusted-key", key],
                ["evaluate", copy, "--data", data, "--trusted-key", key],
                ["export-inference", copy, "--out", tmp_path / "m.onnx", "--trusted-key", key],
                ["profile", copy, "--steps", "1", "--trusted-key", key],
                ["evaluate", copy, "--data", data]]  # with the key from the environment
    env = {**os.environ, TRUSTED_KEY_ENV: key}
    procs = [subprocess.Popen([sys.executable, "-m", "edgetl.runtime", *map(str, c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 2, (p.args, err)
        assert len(err.strip().splitlines()) == 1 and "not signed" in err, (p.args, err)
    assert not (tmp_path / "m.onnx").exists()
    ok = subprocess.run([sys.executable, "-m", "edgetl.runtime", "evaluate", str(copy), "--data",
                         str(data), "--json"], capture_output=True, text=True, timeout=180,
                        env={k: v for k, v in os.environ.items() if k != TRUSTED_KEY_ENV})
    assert ok.returncode == 0, ok.stderr
