"""Profile one ExecuTorch export (issue 9/12: export time) with cProfile. On SIGTERM (e.g. under
`timeout -s TERM 400`) the profile so far is printed, so a slow export can be profiled partway.

    nice -n 19 timeout -s TERM 400 .venv/bin/python bench/et_export_profile.py repvgg bias+mask
"""
from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from families import FAMILIES

    import edgetl
    from edgetl.exporters import export

    family, recipe = (argv + ["repvgg", "bias+mask"][len(argv):])[:2]
    model = FAMILIES[family]()
    pm = edgetl.prepare(model, recipe, num_classes=5, input_shape=model.input_shape)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    prof, t0 = cProfile.Profile(), time.perf_counter()

    def dump(*_):
        prof.disable()
        print(f"elapsed {time.perf_counter() - t0:.1f} s", flush=True)
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
        sys.exit(0)

    signal.signal(signal.SIGTERM, dump)
    prof.enable()
    export(pm, "executorch", Path(tempfile.mkdtemp()), opt, batch_size=2)
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
