"""XNNPACK's workspace need of each delegate call of an ExecuTorch bundle's programs, measured.

    .venv/bin/python bench/et_workspace_calls.py BUNDLE [--top 8]    (needs strace)

With workspace sharing off (one workspace per delegate call) every call's workspace is one mmap
of its own size when the backend plans the calls at load (`etl_presize`); a child loads each
program so under `strace -e mmap` with MALLOC_MMAP_THRESHOLD_=65536 and the allocations of at
least 64 KiB between its markers are read back (the calls' workspaces, and XNNPACK's per-operator
buffers where they are that large). Printed beside the manifest's modelled maximum
(`executorch.xnnpack_workspace_bytes`, exporters/et_workspace.py). See BENCHMARKS.md (task J).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def child(bundle: str) -> None:
    from edgetl.runtime.backends import executorch as et
    from edgetl.runtime.notorch import block_torch

    block_torch()
    if et._lib().etl_xnnpack_sharing(0) != 0:
        raise SystemExit("XNNPACK refused workspace sharing off")
    for pte in ("train_step.pte", "eval.pte"):
        m = et.NativeMethod(Path(bundle) / pte, on_stage=lambda s, p=pte: os.write(2, f"MARK {p} {s}\n".encode()))
        del m


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return child(argv[1])
    bundle, top = argv[0], int(argv[argv.index("--top") + 1]) if "--top" in argv else 8
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run(["strace", "-f", "-e", "trace=mmap,write", "-o", str(log), sys.executable, __file__, "--child",
                        bundle], env=env, check=True, capture_output=True)
        calls: dict[str, list[float]] = {}
        program = None
        for line in log.read_text().splitlines():
            mark = re.search(r"MARK (\S+) (.+?)\\n", line)
            if mark:
                program = mark.group(1) if mark.group(2) == "released" else None
                continue
            size = re.search(r"mmap\(NULL, (\d+),", line)
            if program and size and int(size.group(1)) >= 65536:
                calls.setdefault(program, []).append(int(size.group(1)) / MB)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    info = (manifest.get("extra") or manifest).get("executorch", {})
    for program, sizes in calls.items():
        print(f"{program}: {len(sizes)} allocations while its calls are planned, largest MiB: "
              + ", ".join(f"{s:.2f}" for s in sorted(sizes, reverse=True)[:top]))
    if "xnnpack_workspace_bytes" in info:
        print(f"modelled (manifest): {info['xnnpack_workspace_bytes'] / MB:.2f} MiB")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
