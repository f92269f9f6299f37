"""The device profiler: measured against analytic memory, device budgets, the plot."""
import json
import subprocess
import sys

import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime.profile import devices


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    return export(pm, "onnx", tmp_path_factory.mktemp("p") / "b", batch_size=32)


def _profile(*args):
    return subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", *map(str, args), "--json"],
                          capture_output=True, text=True, timeout=300)


def test_profile_reports_memory_time_and_budget(bundle, tmp_path):
    r = _profile(bundle, "--steps", "3", "--device", "phone-low-2gb", "--plot", tmp_path / "m.png")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"analytic_peak_bytes", "measured_peak_bytes", "step_ms_median", "fits", "breakdown"} <= set(out)
    assert out["fits"] is True and out["budget_bytes"] == 256 * 2**20
    assert out["step_ms_min"] <= out["step_ms_median"] <= out["step_ms_max"]
    # the analytic model and the measurement agree (bench/run.py reports the exact ratios)
    assert 0.7 < out["measured_vs_analytic"] < 1.3, out["measured_vs_analytic"]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_that_does_not_fit(bundle):
    out = json.loads(_profile(bundle, "--steps", "1", "--budget-mb", "1").stdout)
    assert out["fits"] is False


def test_microcontroller_budget_counts_the_program(bundle):
    out = json.loads(_profile(bundle, "--steps", "1", "--device", "mcu-256kb").stdout)
    assert out["counts"] == "program" and out["fits"] is False  # a 10 MB step does not fit 256 KB


def test_unknown_device_is_a_clear_error(bundle):
    r = _profile(bundle, "--device", "toaster")
    assert r.returncode == 2 and "unknown device 'toaster'" in r.stderr and "Traceback" not in r.stderr


def test_device_table_is_data():
    table = devices()
    assert {"mcu-256kb", "phone-low-2gb", "raspberry-pi-4-4gb"} <= set(table)
    assert all(v["counts"] in ("process", "program") and v["budget_mb"] > 0 for v in table.values())
