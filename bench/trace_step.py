"""The live heap set of one training step of a bundle, as the runtime allocates it (blocks >= 1 KB):
its peak and the blocks alive at the peak, beside the bundle's analytic transient peak. Build the counter,
then run with glibc returning freed blocks, as `profile` measures:

    gcc -O2 -shared -fPIC -o /tmp/malloc_trace.so bench/malloc_trace.c -ldl
    MALLOC_MMAP_THRESHOLD_=65536 EDGETL_THREADS=1 LD_PRELOAD=/tmp/malloc_trace.so \\
        .venv/bin/python bench/trace_step.py BUNDLE [STEPS] [/tmp/malloc_trace.so]

Used to find what the analytic model misses or over-counts (BENCHMARKS.md, goal 3); the runtime's node
order comes from onnxruntime's profiler (SessionOptions.enable_profiling)."""
import collections
import ctypes
import sys

import numpy as np

from edgetl.runtime.trainer import Trainer

lib = ctypes.CDLL(sys.argv[3] if len(sys.argv) > 3 else "/tmp/malloc_trace.so")
for f in ("mt_off", "mt_peak_size", "mt_peak_n"):
    getattr(lib, f).restype = ctypes.c_long
t = Trainer.load(sys.argv[1])
b = t.bundle
rng = np.random.default_rng(0)
x, y = t._xy(rng.random((b.batch_size, *b.input_shape), dtype=np.float32),
             rng.integers(0, b.num_classes, b.batch_size).astype(np.int64))
lr = t.lr_at(t.step)
t._train_step(x, y, lr, check=False)  # warm-up, as profile
peaks = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    lib.mt_on()
    t._train_step(x, y, lr, check=False)
    peaks.append(lib.mt_off())
sizes = collections.Counter(lib.mt_peak_size(i) for i in range(lib.mt_peak_n()))
mem = b.manifest["analytic_memory"]
print("traced peaks MB", [round(p / 2**20, 3) for p in peaks], "analytic transient MB",
      round(mem["transient_peak_bytes"] / 2**20, 3), "at", mem.get("peak_at"))
for s, c in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:25]:
    print(f"  {s:>10} x{c} = {s * c / 2**20:.3f} MB")
