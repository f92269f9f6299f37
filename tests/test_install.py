"""A normal (non-editable) install carries all three packages and the runtime's data files."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_the_three_packages_and_device_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgetl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("edgetl/__init__.py", "edgetl/exporters/__init__.py", "edgetl/runtime/__init__.py",
                     "edgetl/runtime/devices.json", "edgetl/runtime/backends/onnx.py", "edgetl/recipes/side.py"):
        assert required in names, required
