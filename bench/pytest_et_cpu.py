"""pytest plugin: which tests are ExecuTorch-export-bound, in CPU time (issue 9, test-suite time).

Per test (setup + call + teardown, so a module fixture's exports count for the test that first
needs them) it records the process CPU time and the CPU time spent inside
`edgetl.exporters.executorch.export_executorch`, and prints the tests with the most ET-export
CPU at the end. `EDGETL_ET_FAST=0` exports without exporters/et_fast.py's shortcuts (the state
before them), for a before/after on the same tests. Wall time (`--durations`) is meaningless on
a loaded machine; CPU time is not.

    EDGETL_ET_FAST=0 nice -n 19 .venv/bin/python -m pytest -q -p bench.pytest_et_cpu tests/test_executorch.py
"""
from __future__ import annotations

import contextlib
import os
import time

import pytest

_rows: list[tuple[str, float, float]] = []
_in_export = [0.0]


def pytest_configure(config) -> None:
    import edgetl.exporters.executorch as et

    if os.environ.get("EDGETL_ET_FAST") == "0":
        et.lazy_recompiles = et.shared_provenance = et.materialize_cia_ops_once = lambda: contextlib.nullcontext()
    base = et.export_executorch

    def timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return base(*args, **kwargs)
        finally:
            _in_export[0] += time.process_time() - c0

    et.export_executorch = timed  # `export` imports it from the module when called


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    c0, e0 = time.process_time(), _in_export[0]
    yield
    _rows.append((item.nodeid, time.process_time() - c0, _in_export[0] - e0))


def pytest_terminal_summary(terminalreporter) -> None:
    tr = terminalreporter
    fast = "off" if os.environ.get("EDGETL_ET_FAST") == "0" else "on"
    total, export = sum(r[1] for r in _rows), sum(r[2] for r in _rows)
    tr.write_sep("=", f"CPU s per test (et_fast shortcuts {fast}): total {total:.1f}, in ET export {export:.1f}")
    for nodeid, cpu, et_cpu in sorted(_rows, key=lambda r: -r[2])[:25]:
        if et_cpu > 0:
            tr.write_line(f"{cpu:7.1f} cpu  {et_cpu:7.1f} in ET export  {nodeid}")
