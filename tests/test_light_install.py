"""A normal (non-editable) install carries all three packages and the runtime's data files, and
`pip install edgetl` is the device runtime alone: in a fresh Python 3.13 venv it brings no torch,
onnx, executorch or cryptography, stays small, checks the host's signature on the bundle (with
edgetl's own Ed25519 verifier) and trains it to the same loss as the host's runtime; the device
CLI's profile and export-inference work there too. On Python 3.10, whose every onnxruntime requires
sympy and mpmath (52 MB it never imports to run a model), the light install less those two is small
and trains the same (README's set-up documents `pip uninstall -y sympy mpmath`)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export

pytestmark = pytest.mark.slow  # a venv and a pip install: ~60-140 s

ROOT = Path(__file__).resolve().parent.parent
MAX_SITE_PACKAGES_MB = 160  # site-packages without pip and setuptools
HOST_ONLY = ("torch", "onnx", "executorch", "sklearn", "skimage", "matplotlib", "cryptography", "cffi")


def _clean_env() -> dict[str, str]:
    """This process's environment less what would point another interpreter at this one's modules."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "EDGETL_TRUSTED_KEY")}


def _python(version: str) -> str | None:
    """An interpreter of `version` that runs (pyenv shims of versions not selected do not)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    for c in filter(None, candidates):
        r = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True,
                           env=_clean_env())
        if r.returncode == 0 and r.stdout.strip() == str(tuple(int(v) for v in version.split("."))):
            return c
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built here only: pip builds in the source tree's build/, where two builds at once (parallel
    test workers) would collide."""
    out = tmp_path_factory.mktemp("wheel")
    try:  # with this env's setuptools (the test extra's), pip needs no isolated build env
        own = int(version("setuptools").split(".")[0]) >= 77
    except PackageNotFoundError:
        own = False
    isolation = ["--no-build-isolation"] if own else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(ROOT), "-w",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("edgetl-*.whl")
    return whl


def test_wheel_has_the_three_packages_and_device_table(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("edgetl/__init__.py", "edgetl/exporters/__init__.py", "edgetl/runtime/__init__.py",
                     "edgetl/runtime/devices.json", "edgetl/runtime/backends/onnx.py", "edgetl/recipes/side.py"):
        assert required in names, required


def _light_venv(version: str, wheel: Path, tmp_path_factory, without: tuple[str, ...] = ()) -> Path:
    """A fresh venv of Python `version` with the plain install of the wheel (what `pip install
    edgetl` gives), less the packages `without`; its python."""
    base = _python(version)
    if base is None:
        pytest.skip(f"python{version} is not installed")
    venv = tmp_path_factory.mktemp(f"py{version}") / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120, env=_clean_env())
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "install", str(wheel)], capture_output=True, text=True, timeout=600, env=_clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    if without:
        r = subprocess.run([*pip, "uninstall", "-y", *without], capture_output=True, text=True, timeout=120,
                           env=_clean_env())
        assert r.returncode == 0, r.stderr[-2000:]
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def light(wheel, tmp_path_factory) -> Path:
    """A fresh Python 3.13 venv with the light install."""
    return _light_venv("3.13", wheel, tmp_path_factory)


@pytest.fixture(scope="module")
def bundle_and_data(tmp_path_factory):
    from edgetl.datasets import load_dataset, save_npz
    from edgetl.runtime.signing import generate_keypair

    root = tmp_path_factory.mktemp("light")
    key, pub = generate_keypair(root / "keys")
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    bundle = export(pm, "onnx", root / "bundle", edgetl.OptimizerConfig.make("sgd", lr=0.05), batch_size=32,
                    sign_key=key)
    data = root / "digits.npz"
    save_npz(load_dataset("digits", input_size=28, channels=1), data)
    return bundle, data, pub


def _cli(python, *args) -> subprocess.CompletedProcess:
    # run outside the source tree, so that only the installed package can be imported
    return subprocess.run([str(python), "-m", "edgetl.runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=_clean_env(), cwd=Path(python).parent)


def _site_packages_mb(python: Path) -> float:
    (site,) = Path(python).parent.parent.glob("lib/python3.*/site-packages")
    total = 0
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0] in ("pip", "setuptools", "_distutils_hack", "pkg_resources"):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total / 2**20


def test_light_install_has_no_host_packages_and_is_small(light):
    r = subprocess.run([str(light), "-c", "import importlib.util as u, json, sys; "
                        f"print(json.dumps([m for m in {list(HOST_ONLY)!r} if u.find_spec(m)]))"],
                       capture_output=True, text=True, cwd=light.parent)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    assert _site_packages_mb(light) <= MAX_SITE_PACKAGES_MB


def _fit_matches_the_host(python, bundle_and_data, *device_args) -> dict:
    """One epoch of `fit` with the signed bundle on `python`'s light install and on the host: the same
    steps and final loss. The device's JSON."""
    bundle, data, pub = bundle_and_data
    fit = ("fit", bundle, "--data", data, "--epochs", 1, "--json", "--no-progress")
    device = _cli(python, *fit, *device_args, "--trusted-key", pub)
    assert device.returncode == 0, device.stderr
    host = _cli(sys.executable, *fit)
    assert host.returncode == 0, host.stderr
    d, h = json.loads(device.stdout), json.loads(host.stdout)
    assert d["steps"] == h["steps"] > 0
    np.testing.assert_allclose(d["final_loss"], h["final_loss"], rtol=1e-4)
    return d


def test_light_install_fits_to_the_hosts_loss(light, bundle_and_data, tmp_path):
    bundle = bundle_and_data[0]
    d = _fit_matches_the_host(light, bundle_and_data, "--checkpoint", tmp_path / "ckpt.npz")
    assert d["test_accuracy"] > 0.5

    out = tmp_path / "model.onnx"
    r = _cli(light, "export-inference", bundle, "--checkpoint", tmp_path / "ckpt.npz", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    r = _cli(light, "profile", bundle, "--steps", 2, "--device", "phone-low-2gb", "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert prof["measured_peak_bytes"] > 0 and prof["analytic_peak_bytes"] > 0 and prof["fits"] is True


def test_light_install_refuses_a_bundle_altered_after_signing(light, bundle_and_data, tmp_path):
    bundle, data, pub = bundle_and_data
    altered = tmp_path / "bundle"
    shutil.copytree(bundle, altered)
    manifest = altered / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b"{", b"{ ", 1))  # same JSON, other bytes
    r = _cli(light, "evaluate", altered, "--data", data, "--trusted-key", pub)
    assert r.returncode == 2 and "altered after signing" in r.stderr, r.stderr


def test_python310_light_install_less_sympy_is_small_and_fits_to_the_hosts_loss(wheel, bundle_and_data, tmp_path_factory):
    python = _light_venv("3.10", wheel, tmp_path_factory, without=("sympy", "mpmath"))
    assert _site_packages_mb(python) <= MAX_SITE_PACKAGES_MB
    _fit_matches_the_host(python, bundle_and_data)
