"""bench/accuracy.py rewrites only its own section of BENCHMARKS.md, and renders a task run on its own."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accuracy  # noqa: E402


def test_update_keeps_other_sections(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# b\n\nbefore\n\n{accuracy.START}\nold accuracy\n{accuracy.END}\n\n## Memory\n\nafter 117 MB\n")
    accuracy.update_benchmarks(md, f"{accuracy.START}\nnew accuracy\n{accuracy.END}")
    assert md.read_text() == f"# b\n\nbefore\n\n{accuracy.START}\nnew accuracy\n{accuracy.END}\n\n## Memory\n\nafter 117 MB\n"


def test_committed_results_render_every_task() -> None:
    results = json.loads((ROOT / "bench" / "results" / "accuracy.json").read_text())
    section = accuracy.markdown(results)
    for name, task in results["tasks"].items():
        assert f"### {name}:" in section
        if task.get("run"):
            assert f"Run on its own on {task['run']['date']}" in section
