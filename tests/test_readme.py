"""The README's quick start runs as written: every line of its bash block, then its python block,
in order, in an empty directory (`edgetl` and `python` are this environment's)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_blocks() -> tuple[list[str], str]:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    section = section[: section.index("\n## ", 1)]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [line for line in bash.splitlines() if line.strip()], python


def test_quick_start_blocks_are_found():
    lines, python = quick_start_blocks()
    assert lines[0].startswith("edgetl plan") and any("export-inference" in line for line in lines)
    assert "Trainer.load" in python


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    lines, python = quick_start_blocks()
    work, shims = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    shims.mkdir()
    for name, command in [("edgetl", f'exec "{sys.executable}" -m edgetl "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"')]:
        (shims / name).write_text(f"#!/bin/sh\n{command}\n")
        (shims / name).chmod(0o755)
    env = {"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(tmp_path)}
    outputs = []
    for line in lines:
        r = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        outputs.append(r.stdout)
    fit = json.loads(next(o for line, o in zip(lines, outputs) if " fit " in line))
    assert fit["steps"] > 0 and fit["test_accuracy"] > 0.5
    assert (work / "model.onnx").is_file() and (work / "mem.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run(["python", "-c", python], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'accuracy'" in r.stdout
