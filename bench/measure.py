"""Peak resident memory of a block of code, above the level just before it (Linux)."""
from __future__ import annotations

import time


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure_steps(step, steps: int) -> dict:
    """Run `step()` `steps` times; peak RSS above the pre-step level and step times."""
    before = status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    peak = status_kb("VmHWM") * 1024
    times.sort()
    return {"measured_peak_bytes": max(peak - before, 0), "step_ms_median": times[len(times) // 2],
            "step_ms_min": times[0], "process_peak_bytes": peak}
