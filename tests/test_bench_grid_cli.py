"""bench/families.py and bench/unseen_architectures.py share one load/run/merge/render path
(`run_grid_cli`): a rerun replaces only its own rows, a render runs nothing."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_families", ROOT / "bench" / "families.py")
bench_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_families)


def _row(name: str, recipe: str, target: str, status: str) -> dict:
    return {"model": name, "recipe": recipe, "target": target, "status": status}


def _table(rows: list[dict]) -> str:
    return ";".join(f"{x['model']} {x['recipe']} {x['target']} {x['status']}" for x in rows)


def test_rerun_replaces_only_its_rows(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([_row("a", "side", "onnx", "failed"), _row("b", "side", "onnx", "ok")]))
    ran = []

    def fake_run_grid(todo, key, make, kept, p):
        ran.append(todo)
        assert key == "model" and p == path and [x["model"] for x in kept] == ["b"]
        return [_row(n, r, t, "ok") for n, r, t in todo]

    monkeypatch.setattr(bench_families, "run_grid", fake_run_grid)
    todo = bench_families.grid(["a"], ["side"], ["onnx"])
    assert todo == [("a", "side", "onnx")]
    text = bench_families.run_grid_cli(path, todo, "model", None, _table)
    assert ran == [todo] and text == "b side onnx ok;a side onnx ok"


def test_render_runs_nothing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([_row("a", "side", "onnx", "ok")]))
    monkeypatch.setattr(bench_families, "run_grid", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    assert bench_families.run_grid_cli(path, None, "model", None, _table) == "a side onnx ok"
    assert bench_families.run_grid_cli(tmp_path / "none.json", None, "model", None, _table) == ""


def test_grid_order_is_target_then_model_then_recipe() -> None:
    assert bench_families.grid(["a", "b"], ["r1", "r2"], ["onnx", "executorch"])[:3] == [
        ("a", "r1", "onnx"), ("a", "r2", "onnx"), ("b", "r1", "onnx")]
