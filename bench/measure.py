"""Peak resident memory of a block of code, above the level just before it (Linux), measured
the way the device profiler measures (edgetl.runtime.profile)."""
from __future__ import annotations

import time

from edgetl.runtime.profile import reset_peak, status_kb


def measure_steps(step, steps: int) -> dict:
    """Run `step()` `steps` times; peak RSS above the pre-step level and step times."""
    before = status_kb("VmRSS") * 1024
    if not reset_peak():
        raise OSError("cannot reset the peak-RSS counter (/proc/self/clear_refs)")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    peak = status_kb("VmHWM") * 1024
    times.sort()
    return {"measured_peak_bytes": max(peak - before, 0), "step_ms_median": times[len(times) // 2],
            "step_ms_min": times[0], "process_peak_bytes": peak}
