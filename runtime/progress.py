"""A small progress bar on stderr (no dependency)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.stream = stream or sys.stderr
        self.n, self.start, self.last = 0, time.perf_counter(), 0.0
        self.postfix = ""

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.2 or self.n >= self.total):
            self.last = now
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            rate = self.n / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else 0
            self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {self.postfix} ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
