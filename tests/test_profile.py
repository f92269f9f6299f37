"""The device profiler: measured against analytic memory, device budgets, the plot."""
import json
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

import edgetl
from edgetl.exporters import export
from edgetl.runtime.backends.base import Resident, above_libraries
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


def test_memory_and_time_come_from_separate_runs(bundle):
    """Memory in a run with the mmap setting (RSS follows the live set); step time in one with the
    default allocator, since the setting slows allocation 2.5-3.5x. Also when the caller has the setting."""
    for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "1", "--json"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["memory_run"] == {"process": "child", "allocator": "MALLOC_MMAP_THRESHOLD_=65536"}
        assert out["time_run"]["allocator"] == "default" and out["step_ms_median"] > 0
        assert out["time_run"]["process"] == ("child" if env else "this")
        assert 0 < out["step_cpu_ms_min"] <= out["step_cpu_ms_median"] <= out["step_cpu_ms_max"]
        # load-time memory: the whole life's peak, above the runtime's libraries, includes the step's
        assert out["whole_peak_bytes"] >= max(out["load_peak_bytes"], out["process_peak_bytes"])
        assert out["measured_peak_bytes"] <= out["whole_above_libraries_bytes"] < out["whole_peak_bytes"]
        assert out["libraries_paged_in_bytes"] >= 0
        assert "onnxruntime" in out["versions"] and "torch" not in out["versions"]


def test_a_run_with_the_memory_setting_reports_no_step_time(bundle):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "EDGETL_PROFILE_PART": "time"}
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(bundle), "--steps", "1", "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    out = json.loads(r.stdout)
    assert out["step_ms_median"] is None and "no step time" in out["time_run"]["note"]
    assert out["step_cpu_ms_median"] is None


def test_microcontroller_ram_and_flash_apart(bundle):
    out = json.loads(_profile(bundle, "--steps", "1", "--device", "mcu-256kb").stdout)
    assert out["flash_budget_bytes"] == 2**20 and out["flash_bytes"] > out["breakdown"]["frozen_weights_bytes"]
    assert out["ram_bytes"] == out["analytic_peak_bytes"] - out["breakdown"]["frozen_weights_bytes"]


def test_library_pages_paged_in_late_are_not_training_memory(tmp_path):
    """ExecuTorch's shim and torch page their libraries in while programs load and run, onnxruntime at
    import (before the level `whole_above_libraries_bytes` is measured from): a library page counts as
    library whenever it is first touched, an allocation as memory."""
    lib = tmp_path / "libruntime.so"
    lib.write_bytes(os.urandom(8 * 2**20))
    before = Resident.now()
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as code:
        sum(code[i] for i in range(0, len(code), mmap.PAGESIZE))  # the library paged in after `before`
        with mmap.mmap(-1, 4 * 2**20) as data:  # 4 MiB allocated (new pages, whatever the allocator holds)
            np.frombuffer(data, np.uint8)[:] = 1
            after = Resident.now()
        assert after.libraries - before.libraries >= 7.5 * 2**20
        above = above_libraries(after.total, before, after)
    assert 3.5 * 2**20 <= above <= 5.5 * 2**20, above / 2**20  # ~12 MiB with the library pages counted
