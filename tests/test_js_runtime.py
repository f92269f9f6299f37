"""The JavaScript device runtime (runtime/js): its own test suite (node --test) against bundles this
checkout exports, run from here so that the README's test command covers it. Needs Node >= 20;
installs the npm dependencies (`npm ci`) when node_modules is missing."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "runtime" / "js"


@pytest.mark.slow
def test_js_runtime_suite(tmp_path):
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the JavaScript runtime's tests need Node.js >= 20 and npm on PATH"
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"npm ci failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    env = {**os.environ, "EDGETL_PYTHON": sys.executable, "EDGETL_JS_FIXTURES": str(tmp_path / "fixtures")}
    r = subprocess.run([node, "--test", "--test-concurrency=1", "test/"], cwd=JS, capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, f"node --test failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert "# fail 0" in r.stdout and "# pass 0" not in r.stdout
