"""ExecuTorch export time before/after lazy recompiles and shared provenance (issue 9), A/B interleaved.
`before` still skips XNNPACK's identity re-traces and identity decompositions, as session 6 left it
(`--plain`: `before` is ExecuTorch's own lowering, skipping nothing). Each export runs in its own process, arms
alternate, and the export's process CPU time is reported (wall time is meaningless on a shared
machine). Also checks that both arms write the same files, byte for byte.

    nice -n 19 .venv/bin/python bench/et_export_speed.py resnet18:full efficientnet_b0:bias+mask --rounds 1
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("before", "after")


def worker(family: str, recipe: str, arm: str, plain: bool = False) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from families import FAMILIES

    import edgetl
    import edgetl.exporters.executorch as et
    from edgetl.exporters import export

    counts: dict = {}
    retraces, decompositions = et.skip_identity_retraces, et.skip_identity_decompositions
    et.skip_identity_retraces = lambda: retraces(counts)
    et.skip_identity_decompositions = lambda: decompositions(counts)
    if arm == "before":  # as session 6 left it: no lazy recompiles, provenance deep-copied (et_fast.py)
        et.lazy_recompiles = et.shared_provenance = et.materialize_cia_ops_once = lambda: contextlib.nullcontext()
        if plain:
            et.skip_identity_decompositions = et.skip_identity_retraces = lambda: contextlib.nullcontext()
    split = et.split_at_outside_uses

    def spy(graph, partitions):
        pieces = split(graph, partitions)
        counts.setdefault("delegates", []).append(len(pieces))
        return pieces

    et.split_at_outside_uses = spy
    model = FAMILIES[family]()
    pm = edgetl.prepare(model, recipe, num_classes=5, input_shape=model.input_shape)
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    out = Path(tempfile.mkdtemp(prefix="edgetl-et-speed-"))
    c0 = time.process_time()
    import executorch.exir  # noqa: F401  (imported once per process: timed apart from the export)
    c0, imported = time.process_time(), time.process_time() - c0
    t0 = time.perf_counter()
    export(pm, "executorch", out, opt, batch_size=2)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(out.glob("*.pte"))}
    return {"family": family, "recipe": recipe, "arm": arm, "cpu_s": round(cpu, 1), "import_cpu_s": round(imported, 1), "wall_s": round(wall, 1),
            "pte_sha256": sha, **counts}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help="family:recipe")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--plain", action="store_true", help="before = ExecuTorch's own lowering (no skips)")
    p.add_argument("--worker", nargs=3, metavar=("FAMILY", "RECIPE", "ARM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, plain=args.plain)), flush=True)
        return 0
    rows = []
    for case in args.cases:
        family, recipe = case.split(":")
        for r in range(args.rounds):
            for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                plain = ["--plain"] if args.plain else []
                res = subprocess.run([sys.executable, __file__, "--worker", family, recipe, arm, *plain],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    for case in args.cases:
        family, recipe = case.split(":")
        by = {a: [x for x in rows if (x["family"], x["recipe"], x["arm"]) == (family, recipe, a)] for a in ARMS}
        same = all(x["pte_sha256"] == by["before"][0]["pte_sha256"] for a in ARMS for x in by[a])
        cpu = {a: min(x["cpu_s"] for x in by[a]) for a in ARMS}
        print(f"{family} {recipe}: export CPU s before {cpu['before']}, after {cpu['after']} "
              f"(x{cpu['before'] / max(cpu['after'], 1e-9):.1f}); files identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
