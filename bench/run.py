"""Training memory and speed, side by side with what users would pick instead. Every row runs in
its own fresh process on this machine; edgetl's programs and ONNX Runtime's artifacts are
measured by the torch-free device profiler. Writes BENCHMARKS.md (its memory section) and
bench/results/memory.json.

    python bench/run.py            # the full comparison (~20-40 min on 2 cores)
    python bench/run.py --smoke    # one small model, a few rows (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LEAN_RECIPES = ["bias", "bias+mask", "side", "side+mask", "full"]
ORT_FOR = {"bias": "bias", "bias+mask": "bias", "side": "side", "side+mask": "side", "full": "full"}
CONFIGS = {
    "full": [
        # ExecuTorch's joint flow cannot run EfficientNet-Lite0: autograd turns its TF "same" padding
        # into a negative constant_pad_nd, which ExecuTorch's portable kernel rejects.
        # with micro-batches too (issue 12 goal 1: bias+mask at 2 samples per call, side+mask at 1)
        {"model": "efficientnet_lite0", "size": 224, "batch": 8, "steps": 3, "et": LEAN_RECIPES[:4], "joint": False,
         "micro": [("bias+mask", 2), ("side+mask", 1)]},
        {"model": "mobilenet_v2", "size": 224, "batch": 8, "steps": 3, "et": ["bias+mask", "side"], "joint": True},
        {"model": "mnist_cnn", "size": 28, "batch": 32, "steps": 5, "et": LEAN_RECIPES, "joint": True},
        # Bring your own CNN: the tests/families models, written as torchvision writes them (bench/worker.py)
        {"model": "resnet18-like", "size": 128, "batch": 8, "steps": 3, "et": [], "joint": False,
         "recipes": ["bias+mask", "side", "full"], "autograd": ["bias"], "ort": []},
        {"model": "efficientnet_b0-like", "size": 128, "batch": 8, "steps": 3, "et": [], "joint": False,
         "recipes": ["bias+mask", "bias+mask+q8", "side", "full"], "autograd": ["bias"], "ort": []},
        # A DeiT-Tiny-sized ViT (tests/families/deit.py): edgetl's transformer recipes against torch and
        # HF peft's LoRA at the same rank on the same layers (the `bench` extra installs peft)
        {"model": "deit_tiny-like", "size": 224, "batch": 8, "steps": 3, "et": [], "joint": False,
         "recipes": ["lora", "lora+q8", "bias+q8", "side", "full"], "autograd": [], "ort": [], "peft": [4]},
    ],
    "smoke": [{"model": "mnist_cnn", "size": 28, "batch": 8, "steps": 2, "et": [], "joint": False,
               "recipes": ["bias+mask"], "ort": ["bias"], "micro": [("bias+mask", 2)]}],
}
# Memory and step time come from separate runs: memory with glibc returning every freed block to the
# system (RSS follows the live set), time with the default allocator (the setting slows allocation
# 2.5-3.5x). `profile` makes that split itself; the torch and ExecuTorch-joint workers run twice.
# Every row computes on one thread (EDGETL_THREADS: onnxruntime's intra-op threads, torch's threads,
# ExecuTorch's thread pool), and
# its step time is the process's CPU time over the step: on a shared machine wall time counts the waits
# for a core, and an idle pool thread's spinning would count as CPU time.
ENV_TIME = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"},
            "PYTHONWARNINGS": "ignore", "EDGETL_THREADS": "1"}
ENV_MEMORY = {**ENV_TIME, "MALLOC_MMAP_THRESHOLD_": "65536"}
TIME_KEYS = ("step_ms_median", "step_ms_min", "step_ms_max", "step_cpu_ms_median", "step_cpu_ms_min",
             "step_cpu_ms_max")
HOST_PACKAGES = ("torch", "onnx", "onnxruntime", "executorch")  # the exporters' side, recorded with every row


def _run(cmd: list[str], timeout: int = 1200, env: dict | None = None) -> dict:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV_TIME, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _run_split(cmd: list[str], timeout: int = 1200) -> dict:
    """A worker row run twice: memory from the run with the memory setting, time from the other."""
    mem = _run(cmd, timeout, ENV_MEMORY)
    if "error" in mem:
        return mem
    t = _run(cmd, timeout, ENV_TIME)
    out = {k: v for k, v in mem.items() if k not in (*TIME_KEYS, "allocator")}
    out["memory_run"] = {"process": "worker", "allocator": mem.get("allocator")}
    if "error" in t:
        out["time_run"] = {"process": "worker", "allocator": "default", "note": f"no step time: {t['error']}"}
    else:
        out |= {k: t[k] for k in TIME_KEYS if k in t}
        out["time_run"] = {"process": "worker", "allocator": t.get("allocator")}
    return out


def _step(r: dict) -> str:
    """A row's step CPU time; a wall time from an older run (with the memory setting, or without CPU
    time) in parentheses with †."""
    if r.get("step_cpu_ms_median") is not None and (r.get("time_run") or {}).get("allocator") == "default":
        return f"{r['step_cpu_ms_median']:.0f}"
    if r.get("step_ms_median") is None:
        return "–"
    return f"({r['step_ms_median']:.0f})†"


def host_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in HOST_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _export(model: str, recipe: str, target: str, size: int, batch: int, out: Path, micro_batch: int | None = None,
            **kw) -> Path | dict:
    """The bundle, or {"error": ...} when the exporter refuses (reported in the table). `micro_batch`:
    its step takes that many samples per call and accumulates the batch's gradients."""
    import edgetl
    from edgetl.exporters import export
    from worker import prepare

    momentum = 0.0 if target == "ort-training" else 0.9
    try:
        pm = prepare(model, recipe, size, **kw)
        return export(pm, target, out, edgetl.OptimizerConfig.make("sgd", lr=0.01, momentum=momentum), batch,
                      micro_batch=micro_batch)
    except Exception as e:  # a failed row must not lose the others
        return {"error": f"export failed: {type(e).__name__}: {e}"[:300]}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _profile(bundle: Path | dict, steps: int) -> dict:
    from edgetl.runtime.backends.ort_peer import bindings_here, peer_command

    if isinstance(bundle, dict):
        return bundle
    args = ["profile", str(bundle), "--steps", str(steps), "--json"]
    ort_peer = json.loads((bundle / "manifest.json").read_text())["target"] == "ort-training" and not bindings_here()
    # ORT's training bindings live in their own Python where this one has plain onnxruntime: measure there
    r = _run(peer_command(*args) if ort_peer else [sys.executable, "-m", "edgetl.runtime", *args])
    if "error" not in r:
        r["bundle_bytes"] = _size(bundle)
    return r


def bench_config(cfg: dict, work: Path, log) -> list[dict]:
    m, size, b, steps = cfg["model"], cfg["size"], cfg["batch"], cfg["steps"]
    rows = []

    def add(row, result):
        row |= result | {"model": m, "size": size, "batch": b}  # the config's name, not the manifest's
        rows.append(row)
        log(row)

    add({"row": "torch eager, full fine-tuning", "system": "torch", "recipe": "full"},
        _run_split([sys.executable, "bench/worker.py", "torch-full", m, str(size), str(b), str(steps)]))
    for recipe in cfg.get("autograd", cfg.get("recipes", ["bias", "side"])):
        add({"row": "torch eager autograd, same trainable set", "system": "torch", "recipe": recipe},
            _run_split([sys.executable, "bench/worker.py", "torch-autograd", m, str(size), str(b), str(steps),
                        recipe]))
    for recipe in cfg.get("ort", ["bias", "side", "full"]):
        bundle = _export(m, recipe, "ort-training", size, b, work / f"{m}-{recipe}-ort")
        add({"row": "ONNX Runtime training artifacts", "system": "ort-training", "recipe": recipe},
            _profile(bundle, steps))
    for rank in cfg.get("peft", []):
        add({"row": "torch + HF peft LoRA", "system": "torch-peft", "recipe": "lora" if rank == 4 else f"lora{rank}"},
            _run_split([sys.executable, "bench/worker.py", "torch-peft", m, str(size), str(b), str(steps), str(rank)]))
    if cfg["joint"]:
        add({"row": "ExecuTorch joint-graph training", "system": "executorch-joint", "recipe": "bias"},
            _run_split([sys.executable, "bench/worker.py", "et-joint", m, str(size), str(b), "2", "bias"],
                       timeout=900))
    for recipe in cfg.get("recipes", LEAN_RECIPES):
        bundle = _export(m, recipe, "onnx", size, b, work / f"{m}-{recipe}-onnx")
        add({"row": "edgetl lean step, onnxruntime", "system": "edgetl-onnx", "recipe": recipe}, _profile(bundle, steps))
    for recipe, micro in cfg.get("micro", []):
        bundle = _export(m, recipe, "onnx", size, b, work / f"{m}-{recipe}-mb{micro}-onnx", micro_batch=micro)
        add({"row": f"edgetl lean step, onnxruntime, micro-batch {micro}", "system": "edgetl-onnx", "recipe": recipe,
             "micro_batch": micro}, _profile(bundle, steps))
    for recipe in cfg["et"]:
        bundle = _export(m, recipe, "executorch", size, b, work / f"{m}-{recipe}-et")
        add({"row": "edgetl lean step, ExecuTorch", "system": "edgetl-executorch", "recipe": recipe},
            _profile(bundle, steps))
    if "recipes" not in cfg and not isinstance(fp32 := _export(m, "bias+mask", "onnx", size, b, work / f"{m}-fp32-onnx",
                                                              frozen_dtype="fp32"), dict):
        rows.append({"model": m, "row": "bundle size check", "system": "edgetl-onnx", "recipe": "bias+mask",
                     "fp32_bundle_bytes": _size(fp32),
                     "int8_bundle_bytes": _size(work / f"{m}-bias+mask-onnx")})
    return rows


def mcu_row(work: Path) -> dict:
    """mnist_cnn, bias+mask, batch 1: ExecuTorch's planned memory vs the 256 KB class."""
    bundle = _export("mnist_cnn", "bias+mask", "executorch", 28, 1, work / "mnist-b1-et")
    man = json.loads((bundle / "manifest.json").read_text())
    planned = man["executorch"]["planned_bytes"]
    mem = man["analytic_memory"]
    pl = mcu_plan()
    return {"model": "mnist_cnn", "batch": 1, "recipe": "bias+mask", "planned_bytes": planned,
            "program_bytes": (bundle / man["programs"]["train_step"]).stat().st_size,
            "frozen_weights_bytes": mem["frozen_weights_bytes"], "analytic_peak_bytes": mem["analytic_peak_bytes"],
            "vs_256kb": planned / (256 * 1024), "plan": pl, "portable": mcu_portable(pl["weight_block_bytes"])}


def mcu_portable(block: int) -> dict:
    """ExecuTorch's memory plan of the step on its own kernels (int8 weights in the program,
    dequantized in the step), with whole weights and with the plan's row blocks (bench/et_plan.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from et_plan import lowered_step
    from edgetl.exporters.executorch import planned_bytes

    return {"weight_block_bytes": block, "command": MCU_PORTABLE.format(kb=block // 1024),
            "whole_planned_bytes": planned_bytes(lowered_step("mnist_cnn", 28, 1, "bias+mask", False)),
            "blocked_planned_bytes": planned_bytes(lowered_step("mnist_cnn", 28, 1, "bias+mask", False, block))}


MCU_PORTABLE = "python bench/et_plan.py --portable --weight-block-kb {kb} mnist_cnn 28 1 bias+mask"


MCU_PLAN = "edgetl plan mnist_cnn --device mcu-256kb --recipe bias+mask --batch-size 1 --input-size 28"


def mcu_plan() -> dict:
    """The analytic plan of the microcontroller row: RAM and flash apart, and what dominates RAM."""
    import edgetl
    from edgetl.plan import plan

    from edgetl.exporters import lowering

    p = plan("mnist_cnn", device="mcu-256kb", recipes=["bias+mask"], batches=[1], input_size=28)
    (c,) = p.candidates
    mem = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10).memory(
        1, edgetl.OptimizerConfig.make("sgd", None, momentum=0.9), lowering(p.target, p.weight_block_bytes))
    return {"command": MCU_PLAN, "ram_bytes": c.ram_bytes, "flash_bytes": c.flash_bytes,
            "ram_budget_bytes": p.budget_bytes, "flash_budget_bytes": p.flash_budget_bytes,
            "weight_block_bytes": p.weight_block_bytes, "peak_at": mem.peak_at, "peak_by_kind": mem.peak_by_kind}


def in_config_order(rows: list[dict]) -> list[dict]:
    """Rows by their model's place in the full configuration (a run of some models keeps the section's order)."""
    order = {c["model"]: i for i, c in enumerate(CONFIGS["full"])}
    return sorted(rows, key=lambda r: order.get(r["model"], len(order)))


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row against the baselines of the same model from the same run (`run`), never mixed."""
    for r in rows:
        if "measured_peak_bytes" not in r:
            continue
        same = [x for x in rows if x["model"] == r["model"] and x.get("run") == r.get("run")
                and "measured_peak_bytes" in x]
        base = next((x for x in same if x["system"] == "torch" and x["recipe"] == "full"), None)
        ort = next((x for x in same if x["system"] == "ort-training" and x["recipe"] == ORT_FOR.get(r["recipe"])), None)
        if base:
            r["x_less_than_torch_full"] = base["measured_peak_bytes"] / max(r["measured_peak_bytes"], 1)
            if r.get("whole_above_libraries_bytes") and base.get("whole_above_libraries_bytes"):
                r["whole_x_less_than_torch_full"] = base["whole_above_libraries_bytes"] / r["whole_above_libraries_bytes"]
            if _step(r)[0].isdigit() and _step(base)[0].isdigit():
                r["step_x_torch_full"] = r["step_cpu_ms_median"] / base["step_cpu_ms_median"]
        if ort:
            r["x_less_than_ort_same_set"] = ort["measured_peak_bytes"] / max(r["measured_peak_bytes"], 1)
        peft = _peft(rows, r)
        if peft and "measured_peak_bytes" in peft and r["system"].startswith("edgetl"):
            r["x_less_than_peft_same_rank"] = peft["measured_peak_bytes"] / max(r["measured_peak_bytes"], 1)
    return rows


def _peft(rows: list[dict], r: dict) -> dict | None:
    """The peft LoRA row at the rank of `r`'s lora part (`lora+q8` against peft's `lora`)."""
    parts = r["recipe"].split("+")
    return next((x for x in rows if x["model"] == r["model"] and x["system"] == "torch-peft"
                 and x["recipe"] in parts and x.get("run") == r.get("run")), None)


def _times(ratio: float) -> str:
    return f"{ratio:.2f}× less memory" if ratio >= 1 else f"{1 / ratio:.2f}× more memory"


def _mb(v) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


NOTES = re.compile(r"<!-- notes:(\S+) -->\n.*?<!-- /notes:\1 -->\n?", re.S)


def read_notes(path: Path) -> dict[str, str]:
    """Hand-written notes inside the generated section, by key (a model, or `mcu`): a regeneration
    puts each back after its model's table, marked `<!-- notes:KEY -->` ... `<!-- /notes:KEY -->`."""
    text = path.read_text() if path.exists() else ""
    return {m.group(1): m.group(0).rstrip("\n") for m in NOTES.finditer(text)}


def _versions(rs: list[dict]) -> str:
    """The packages that exported and measured the rows, as the rows recorded them."""
    seen: dict[str, set] = {}
    for r in rs:
        ran = {("onnxruntime-training (peer)" if k == "onnxruntime" and r["system"] == "ort-training" else k): v
               for k, v in r.get("versions", {}).items()}
        for k, v in {**r.get("host_versions", {}), **ran}.items():
            if k != "numpy":
                seen.setdefault(k, set()).add(v)
    if not seen:
        return "Versions: not recorded (rows from before bench/run.py recorded them)."
    return "Versions: " + ", ".join(f"{k} {' / '.join(sorted(v))}" for k, v in sorted(seen.items())) + "."


def markdown(rows: list[dict], mcu: dict | None, command: str, seconds: float, notes: dict[str, str] | None = None) -> str:
    notes = dict(notes or {})
    lines = [
        "<!-- memory:start -->",
        "## Training memory and step time",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min). Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}. Every row is a fresh process; "
        "*measured* is the peak resident memory above the level just before the first measured step "
        "(plus ExecuTorch's planned arena, which it allocates at load), so weights loaded before training "
        "are not in it. *analytic* is edgetl's model of the same quantity (the step's live set over its "
        "schedule, minus what is resident before the step). SGD with momentum 0.9, except ONNX Runtime's "
        "artifacts (its on-device SGD has no momentum). Torch baselines get one warm-up step. "
        "Memory and step time come from separate runs of each row: memory with `MALLOC_MMAP_THRESHOLD_=65536` "
        "(glibc returns every freed block, so RSS follows the live set), step time with the default allocator "
        "(the setting slows allocation-heavy runtimes 2.5-3.5×). A step time in parentheses with † is a wall time "
        "from a run before this method (taken with the setting on, or on several threads): it is not comparable, "
        "and its row needs re-running. Step time is the step's CPU time: the process's CPU time over each step (all its threads; "
        "`time.process_time`), the median over the measured steps, with every runtime on one compute thread "
        "(onnxruntime's intra-op threads, torch's and ExecuTorch's thread pool, which XNNPACK runs on, set to 1). Wall time is in bench/results/memory.json (`step_ms_*`) but not shown: the "
        "machine is shared, and wall time counts the waits for a core. *whole MB* is the process's peak over its "
        "whole life (importing, loading the model or bundle, a warm-up step and the measured steps) above its "
        "level once the runtime's libraries were imported, before any model or program, less the library pages "
        "paged in after that level (`whole_above_libraries_bytes`: ExecuTorch's and torch's libraries page in "
        "while programs load and run, onnxruntime's mostly at import; no runtime's code is counted); from the "
        "memory run. The peak with the libraries' code is `whole_peak_bytes` in the JSON. "
        "*step vs torch full* is the step CPU time over torch full fine-tuning's in the same run (below 1: faster). "
        "Every ratio is computed between rows of one run (`run` in the JSON).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and "row" in r and r["row"] != "bundle size check"]
        if not rs:
            continue
        r0 = rs[0]
        lines += [f"### {model}, {r0['size']}×{r0['size']}, batch {r0['batch']}", ""]
        if r0.get("command", command) != command or r0.get("note"):
            lines += [f"Rows from `{r0.get('command', command)}`. {r0.get('note', '')}".rstrip(), ""]
        lines += [f"![measured training memory](bench/results/memory_{model}.png)", "",
                  "| system | recipe | measured MB | analytic MB | whole MB | step CPU ms (median) | bundle MB "
                  "| vs torch full | whole vs torch full | step vs torch full | vs ORT same set |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            if "error" in r:
                lines.append(f"| {r['row']} | {r['recipe']} | failed: {r['error'][:80]} | | | | | | | | |")
                continue
            analytic = r.get("analytic_step_bytes") if r["system"].startswith("edgetl") else None
            lines.append(
                f"| {r['row']} | {r['recipe']} | {_mb(r.get('measured_peak_bytes'))} | "
                f"{_mb(analytic)} | {_mb(r.get('whole_above_libraries_bytes'))} | {_step(r)} | "
                f"{_mb(r.get('bundle_bytes'))} | {_x(r.get('x_less_than_torch_full'))} | "
                f"{_x(r.get('whole_x_less_than_torch_full'))} | {_x(r.get('step_x_torch_full'))} | "
                f"{_x(r.get('x_less_than_ort_same_set'))} |")
        lines += [f"\nedgetl `{r['recipe']}` ({r['row'].removeprefix('edgetl lean step, ')}) against torch + HF peft LoRA "
                  f"at the same rank on the same layers: {_times(r['x_less_than_peft_same_rank'])}"
                  + (f", step CPU time ×{r['step_cpu_ms_median'] / p['step_cpu_ms_median']:.2f}" if (p := _peft(rows, r))
                     and _step(r)[0].isdigit() and _step(p)[0].isdigit() else "") + "."
                  for r in rs if r.get("x_less_than_peft_same_rank")]
        size = next((r for r in rows if r["model"] == model and r.get("row") == "bundle size check"), None)
        if size:
            lines += ["", f"Bundle with an int8 backbone: {_mb(size['int8_bundle_bytes'])} MB, with fp32: "
                      f"{_mb(size['fp32_bundle_bytes'])} MB ({size['int8_bundle_bytes'] / size['fp32_bundle_bytes']:.2f}×)."]
        lines += ["", _versions(rs), ""]
        if model in notes:
            lines += [notes.pop(model), ""]
    if mcu:
        lines += ["### Microcontroller class: mnist_cnn, bias+mask, batch 1, ExecuTorch", "",
                  f"Planned memory of the training step: {mcu['planned_bytes'] / 1024:.0f} KB "
                  f"({mcu['vs_256kb']:.2f}× the 256 KB SRAM budget of Lin et al.). The weights are not in it: "
                  f"the program file ({mcu['program_bytes'] / 1024:.0f} KB, flash) stores them as int8 + per-channel "
                  f"scales ({mcu['frozen_weights_bytes'] / 1024:.0f} KB of int8 weights; a frozen linear's weight is "
                  "stored a second time, transposed, for its input gradient), restored at load into fp32 constants "
                  "for XNNPACK to pack, except the 1×1 convs' and linears', which it packs as int8 (the packed copies "
                  "are in RAM). edgetl's analytic peak for the whole step "
                  f"(weights as int8, parameters, state, live set): {mcu['analytic_peak_bytes'] / 1024:.0f} KB.", ""]
        lines += mcu_plan_lines(mcu.get("plan") or mcu_plan())
        if mcu.get("portable"):
            lines += mcu_portable_lines(mcu["portable"])
        if "mcu" in notes:
            lines += [notes.pop("mcu"), ""]
    lines += [n + "\n" for n in notes.values()]  # the microcontroller's, and any whose model has no rows
    lines.append("<!-- memory:end -->")
    return "\n".join(lines)


def mcu_portable_lines(pt: dict) -> list[str]:
    kb = 1024
    return [f"On ExecuTorch's own kernels (no XNNPACK), the program holds the weights as int8 (flash) and the step "
            f"dequantizes them: its memory plan (MB: 10^6 bytes) is {pt['whole_planned_bytes'] / 1e6:.2f} MB with whole weights (two fp32 "
            f"copies of the fc weight at once, the cast and the scaled copy) and {pt['blocked_planned_bytes'] / 1e6:.2f} MB "
            f"({pt['blocked_planned_bytes'] / kb:.0f} KiB) with row blocks of {pt['weight_block_bytes'] / kb:.0f} KB "
            f"(`{pt['command']}`; the plan holds the step's "
            "inputs and outputs too: parameters, optimizer state, new values). An onnx bundle with the same blocks: "
            f"`edgetl export mnist_cnn --recipe bias+mask --target onnx --batch-size 1 --num-classes 10 --weight-block-kb "
            f"{pt['weight_block_bytes'] // kb} --out mcu-bundle` (tests/test_weight_blocks.py: it trains torch-free like the "
            "torch step).", ""]


def mcu_plan_lines(pl: dict) -> list[str]:
    kb = 1024
    kinds = sorted(pl["peak_by_kind"].items(), key=lambda kv: -kv[1])
    top, top_bytes = kinds[0]
    over = pl["ram_bytes"] - pl["ram_budget_bytes"]
    rows = ["| RAM (step: analytic peak minus the frozen weights) | flash (int8 weights + scales) | RAM budget | "
            "flash budget |", "|---:|---:|---:|---:|",
            f"| {pl['ram_bytes'] / kb:.0f} KB | {pl['flash_bytes'] / kb:.0f} KB | {pl['ram_budget_bytes'] / kb:.0f} KB "
            f"| {pl['flash_budget_bytes'] / kb:.0f} KB |", ""]
    flash = ("The int8 weights fit the flash. " if pl["flash_bytes"] <= pl["flash_budget_bytes"] else
             f"The int8 weights are {(pl['flash_bytes'] - pl['flash_budget_bytes']) / kb:.0f} KB over the flash. ")
    blocks = (f"Frozen weights are dequantized in row blocks of at most {pl['weight_block_bytes'] / kb:.0f} KB "
              "(`--weight-block-kb`), so no fp32 copy of a whole weight is in RAM. " if pl.get("weight_block_bytes") else "")
    verdict = flash + blocks + (f"The step's RAM is {over / kb:.0f} KB over 256 KB: at its peak "
               f"(`{pl['peak_at']}`) the largest part is {top} ({top_bytes / kb:.0f} KB); parts at the peak: "
               + ", ".join(f"{k} {v / kb:.0f} KB" for k, v in kinds) + "." if over > 0 else
               f"The step fits the RAM budget with {-over / kb:.0f} KB to spare; at its peak (`{pl['peak_at']}`): "
               + ", ".join(f"{k} {v / kb:.0f} KB" for k, v in kinds) + ".")
    return ["Analytic plan, RAM and flash apart (goal 4), from the analytic model only: "
            f"`{pl['command']}`.", "", *rows, verdict, ""]


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One bar chart per model: measured training memory of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"torch": "#8c8c8c", "ort-training": "#dd8452", "executorch-joint": "#937860",
              "torch-peft": "#c44e52", "edgetl-onnx": "#4c72b0", "edgetl-executorch": "#55a868"}
    files = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and "measured_peak_bytes" in r]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rs) + 1.2))
        labels = [f"{r['row'].replace('edgetl lean step, ', 'edgetl ')} · {r['recipe']}" for r in rs]
        ax.barh(range(len(rs)), [r["measured_peak_bytes"] / 2**20 for r in rs],
                color=[colors.get(r["system"], "#333") for r in rs])
        ax.set_yticks(range(len(rs)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("measured training memory above the pre-step level (MB)")
        ax.set_title(f"{model}, {rs[0]['size']}×{rs[0]['size']}, batch {rs[0]['batch']}", fontsize=9)
        fig.tight_layout()
        path = out / f"memory_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write_section(path: Path, section: str, start: str, end: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured on this machine; each section names its command.\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one small model, a few rows")
    p.add_argument("--models", nargs="*", default=None, help="subset of models to run")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(RESULTS / "memory.json"))
    p.add_argument("--render", action="store_true", help="rewrite the markdown and plots from --json only")
    p.add_argument("--note", default="", help="a remark on this run's rows, shown with them (e.g. the load)")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        plot(saved["rows"], Path(args.json).parent)
        write_section(Path(args.out), markdown(with_ratios(in_config_order(saved["rows"])), saved["mcu"], saved["command"],
                                               saved.get("seconds", 0), read_notes(Path(args.out))),
                      "<!-- memory:start -->", "<!-- memory:end -->")
        return 0
    configs = [c for c in CONFIGS["smoke" if args.smoke else "full"] if not args.models or c["model"] in args.models]
    t0 = time.time()
    rows: list[dict] = []

    def log(row):
        keep = {k: row.get(k) for k in ("model", "row", "recipe", "measured_peak_bytes", "step_ms_median", "error")}
        print(json.dumps(keep), file=sys.stderr, flush=True)

    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() and args.models else {}
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as d:
        for cfg in configs:
            rows += bench_config(cfg, Path(d), log)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
        mcu = None if args.smoke or "mnist_cnn" not in {c["model"] for c in configs} else mcu_row(Path(d))
    # a run of some models keeps the other models' rows from the last results
    ran = {c["model"] for c in configs}
    command = "python bench/run.py" + (" --smoke" if args.smoke else "") + (
        f" --models {' '.join(args.models)}" if args.models else "")
    run, hv = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), host_versions()
    for r in rows:
        r["command"], r["run"], r["host_versions"] = command, run, hv
        if args.note:
            r["note"] = args.note
    rows = [r for r in previous.get("rows", []) if r["model"] not in ran] + rows
    mcu = mcu or previous.get("mcu")
    rows = with_ratios(in_config_order(rows))
    # a run of some models: the section's command and duration stay those of the last full run
    command, seconds = previous.get("command", command), previous.get("seconds", time.time() - t0)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": command, "rows": rows, "mcu": mcu,
                                           "seconds": seconds}, indent=1))
    Path(args.json).with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.smoke:
        plot(rows, Path(args.json).parent)
    write_section(Path(args.out), markdown(rows, mcu, command, seconds, read_notes(Path(args.out))),
                  "<!-- memory:start -->", "<!-- memory:end -->")
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
