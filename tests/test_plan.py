"""`edgetl plan --device/--budget-mb`: the largest trainable set that fits, from the analytic model."""
import json

import pytest

import edgetl
from edgetl.cli import main
from edgetl.exporters import lowering
from edgetl.micro_batch import accumulating
from edgetl.plan import candidate_shapes, plan, render, runtime_base_bytes

MB = 2**20


def _micro_need(pm, batch, micro, target="onnx"):
    """The analytic peak of the step that takes `micro` of `batch` samples per call (whole: micro None)."""
    opt = edgetl.OptimizerConfig.make("sgd", None, momentum=0.9)
    return pm.memory(micro or batch, accumulating(pm, opt, batch, micro), lowering(target)).analytic_peak_bytes


def test_a_budget_that_fits_only_small_batches_picks_them():
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
    ort = {b: _micro_need(pm, b, None, "ort-training") for b in (4, 8)}
    assert runtime_base_bytes("ort-training") is None  # not measured: the plan adds nothing
    p = plan("mnist_cnn", device=None, budget_mb=(ort[4] + ort[8]) / 2 / MB, recipes=["bias+mask"], input_size=28,
             target="ort-training")  # a target whose step takes whole batches only: batch 4 fits, 8 does not
    assert p.chosen.batch == 4 and p.chosen.micro_batch is None
    rejected = {c.batch: c for c in p.candidates if not c.fits}
    assert set(rejected) == {8, 16} and not any(c.micro_batch for c in p.candidates)
    assert "over" in rejected[8].reason and "batch 8 already does not fit" in rejected[16].reason
    assert p.micro_batch_note == "not considered: the ort-training target's step takes whole batches"
    # onnx takes micro-batches: 4 samples per call fit, so batches of 8 and 16 do too, accumulated
    need = {b: pm.memory(b).analytic_peak_bytes for b in (4, 8)}
    base = runtime_base_bytes("onnx")
    budget_mb = (base + (need[4] + need[8]) / 2) / MB  # batch 4 fits whole, batch 8 does not
    p = plan("mnist_cnn", device=None, budget_mb=budget_mb, recipes=["bias+mask"], input_size=28)
    rows = {(c.batch, c.micro_batch): c for c in p.candidates}
    assert (p.chosen.batch, p.chosen.micro_batch) == (16, 4) and p.micro_batch == 4
    assert p.chosen.ram_bytes == _micro_need(pm, 16, 4) + base
    assert rows[(4, None)].reason == "fits; smaller batch than the proposal" and rows[(8, 4)].fits
    assert "over" in rows[(8, None)].reason and "batch 8 already does not fit" in rows[(16, None)].reason


def test_plan_proposes_the_largest_micro_batch_that_fits():
    """The whole batch of 8 does not fit, nor do micro-batches of 4; 2 does (1 would too, slower)."""
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10, input_size=28)
    need = {m: _micro_need(pm, 8, m) for m in (None, 4, 2, 1)}
    assert need[None] > need[4] > need[2] > need[1]
    # the accumulators are optimizer state: one fp32 tensor per trainable plus the call counter
    opt = edgetl.OptimizerConfig.make("sgd", None, momentum=0.9)
    whole2, micro2 = pm.memory(2, opt), pm.memory(2, accumulating(pm, opt, 8, 2))
    assert micro2.optimizer_state_bytes - whole2.optimizer_state_bytes == micro2.trainable_params_bytes + 4
    assert pm.memory(2, accumulating(pm, opt, 4, 2)) == micro2  # whatever the batch it accumulates
    base = runtime_base_bytes("onnx")
    p = plan("mnist_cnn", budget_mb=(base + (need[2] + need[4]) / 2) / MB, recipes=["bias+mask"], batches=[8],
             input_size=28)
    c = p.chosen
    assert (c.batch, c.micro_batch, c.ram_bytes) == (8, 2, need[2] + base) and p.micro_batch == 2
    assert [(r.batch, r.micro_batch, r.fits) for r in p.candidates] == [(8, None, False), (8, 4, False), (8, 2, True)]
    assert all("over" in r.reason for r in p.candidates[:2])
    out = render(p)
    assert "batch 8 in micro-batches of 2 (export with --micro-batch 2)" in out


def test_plan_memory_at_a_micro_batch_is_the_analytic_model(capsys):
    """`edgetl plan M --recipe R --batch-size 8 --micro-batch 2`: the step export --micro-batch 2 writes."""
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10, input_size=28)
    args = ["plan", "mnist_cnn", "--recipe", "bias+mask", "--input-size", "28", "--batch-size", "8", "--json"]
    assert main([*args, "--micro-batch", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    mem = pm.memory(2, accumulating(pm, edgetl.OptimizerConfig.make("sgd", None, momentum=0.9), 8, 2))
    assert out["micro_batch"] == 2 and out["analytic_peak_bytes"] == mem.analytic_peak_bytes
    assert out["breakdown"] == mem.breakdown()
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["analytic_peak_bytes"] == _micro_need(pm, 8, None)
    assert main([*args[:-1], "--micro-batch", "2"]) == 0
    assert "batch 8 in micro-batches of 2" in capsys.readouterr().out


@pytest.mark.parametrize("bad, says", [(["--micro-batch", "3"], "divisor of --batch-size 8"),
                                       (["--micro-batch", "2", "--target", "ort-training"], "for the onnx and executorch targets"),
                                       (["--micro-batch", "2", "--budget-mb", "100"], "tries micro-batches itself")])
def test_plan_micro_batch_refusals(bad, says, capsys):
    assert main(["plan", "mnist_cnn", "--recipe", "bias+mask", "--batch-size", "8", *bad]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_most_trainable_capacity_wins():
    p = plan("mnist_cnn", budget_mb=512, recipes=["head", "side+mask"], batches=[1, 16], input_size=28)
    assert (p.chosen.recipe, p.chosen.batch) == ("side+mask", 16)
    head = {c.batch: c for c in p.candidates if c.recipe == "head"}
    assert head[1].fits and "fewer trainable params" in head[1].reason
    # a group that cannot beat the proposal is only checked at its smallest batch (keeps plan fast)
    assert head[16].planned_bytes is None and head[16].reason.startswith("not analysed")


def test_smaller_input_sizes_are_candidates():
    assert candidate_shapes((3, 224, 224)) == [(3, 224, 224), (3, 168, 168), (3, 112, 112)]
    assert candidate_shapes((1, 16000)) == [(1, 16000)]


def test_impossible_budget_says_so_in_one_line(capsys):
    assert main(["plan", "mnist_cnn", "--budget-mb", "1", "--recipe", "head", "--input-size", "28"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("edgetl: nothing fits 1.0 MB: the smallest, head batch 1")
    assert "no: " in out and "PROPOSED" not in out


def test_unknown_device_exits_2(capsys):
    assert main(["plan", "mnist_cnn", "--device", "toaster"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'toaster'" in err and err.count("\n") == 1


def test_microcontroller_reports_ram_and_flash_apart(capsys):
    """Goal 4's row: mnist_cnn, bias+mask, batch 1 on a 256 KB RAM / 1 MB flash microcontroller."""
    rc = main(["plan", "mnist_cnn", "--device", "mcu-256kb", "--recipe", "bias+mask", "--batch-size", "1",
               "--input-size", "28", "--json"])
    out = json.loads(capsys.readouterr().out)
    # the executorch step with frozen weights dequantized in row blocks of 1/16 of the RAM
    assert out["target"] == "executorch" and out["weight_block_bytes"] == 16 * 1024
    mem = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10).memory(
        1, edgetl.OptimizerConfig.make("sgd", None, momentum=0.9), lowering("executorch", 16 * 1024))
    (c,) = out["candidates"]
    assert out["counts"] == "program" and out["flash_budget_bytes"] == MB and out["budget_bytes"] == 256 * 1024
    assert c["flash_bytes"] == mem.frozen_weights_bytes < MB  # int8 weights fit the flash
    assert c["ram_bytes"] == mem.analytic_peak_bytes - mem.frozen_weights_bytes
    # no fp32 copy of a whole weight (1152 KB for the fc) at the peak any more
    assert mem.peak_by_kind.get("weights (dequantized, transient)", 0) <= 16 * 1024
    # the step fits 256 KB of RAM (activation masks and their backward at the pooled size, the
    # max pools' backward without stacked taps); it was 314 KB
    assert rc == 0 and c["fits"] and out["chosen"] == c and c["ram_bytes"] <= 256 * 1024
    assert out["micro_batch"] is None  # its one sample fits whole


def test_single_recipe_plan_still_works(capsys):
    assert main(["plan", "mnist_cnn", "--recipe", "head", "--classes", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 8


def test_plan_needs_a_recipe_or_a_budget(capsys):
    assert main(["plan", "mnist_cnn"]) == 2
    assert "--device/--budget-mb" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--budget-mb", "0"], ["--budget-mb", "5", "--batch-size", "0"]])
def test_bad_budget_or_batch_exits_2(bad, capsys):
    assert main(["plan", "mnist_cnn", *bad]) == 2
    assert capsys.readouterr().err.startswith("edgetl: error: ")


def test_plan_shows_where_a_transformers_kept_memory_goes(tmp_path, capsys):
    """deit (2 blocks, dim 32, MLP 64, 2 heads, 16 tokens + class): each recipe's kept memory by
    what it is for, counted from the shapes the model has; q8 keeps probabilities and GELU inputs at 8 bits."""
    from edgetl.kept_kinds import GELU_IN, LORA, NORM, PROBS
    from families._common import prepare_model
    from families.transformers import TRANSFORMERS

    mems = {r: prepare_model(TRANSFORMERS, "deit", r).memory(8) for r in ("lora", "bias", "bias+q8")}
    for m in mems.values():
        assert sum(m.kept_by_kind.values()) == m.kept_activations_bytes
    b, n, fp32 = 8, 17, 4
    lora, bias, q8 = (mems[r].kept_by_kind for r in ("lora", "bias", "bias+q8"))
    assert lora[LORA] == b * n * (32 + 32 + 32 + 64) * 2 * fp32  # every qkv, proj, fc1, fc2 keeps its input
    probs = b * 2 * n * n  # one block's softmax(q kᵀ), per byte
    assert bias[PROBS] == 2 * probs * fp32  # the explicit block's matmul shares the softmax's kept p
    gelu = 2 * b * n * 64
    assert bias[GELU_IN] == gelu * fp32 and gelu <= q8[GELU_IN] < gelu + 1024  # uint8 codes + scales
    # the fused block's probabilities at 8 bits; the explicit block's next matmul still keeps p at fp32
    assert probs * (1 + 1 + fp32) <= q8[PROBS] < probs * (1 + 1 + fp32) + 1024
    assert NORM in lora and q8[NORM] < bias[NORM]

    model = tmp_path / "deit_model.py"
    model.write_text("from families.deit import deit_like\n\n\ndef deit():\n    return deit_like(num_classes=5)\n")
    assert main(["plan", f"{model}:deit", "--recipe", "lora,bias+q8", "--num-classes", "5",
                 "--input-shape", "3,32,32"]) == 0
    out = capsys.readouterr().out
    lora_part, q8_part = out.split("recipe bias+q8")
    assert "recipe lora" in lora_part and f"{LORA} " in lora_part and f"{PROBS} " in lora_part
    assert f"{LORA} " not in q8_part and f"{GELU_IN} " in q8_part and f"{NORM} " in q8_part
