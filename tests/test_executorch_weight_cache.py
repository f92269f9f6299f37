"""ExecuTorch's XNNPACK weight cache packs each frozen linear weight one way (`Lowering.linear_input_grad_own_weight`,
`Lowering.int8_frozen_linear`, LoRA linears' frozen weights included).

The cache names a packed weight by its constant alone. A frozen linear weight read by the forward (x . W^T) and by
the input gradient (g @ W, packed transposed) was one constant packed two ways: each later program that read it
(the eval program's forward) found the wrong packing under its name and packed it again, and closing the programs
logged `delete_packed_data: '...' not found`. A small MLP whose middle linear is frozen and passes a gradient back
to trainable biases (or, with LoRA, to the first linear's branch), exported with fp32 and with int8 frozen weights;
int8 ones stay int8 in the programs (XNNPACK's f32_qc8w linear), not fp32 constants."""
import gc

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("executorch")

import edgetl  # noqa: E402
from edgetl.exporters import export  # noqa: E402
from edgetl.optim import OptimizerConfig  # noqa: E402
from edgetl.runtime import Trainer  # noqa: E402
from edgetl.runtime.data import normalize  # noqa: E402

B = 4
OPT = OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                         nn.Linear(96, 10)).eval()


def _program_bytes(path) -> int:
    """The size of the ExecuTorch program in `path`, restored where the file stores it int8-packed."""
    from edgetl.runtime.backends.executorch_q8 import is_packed, unpack

    data = path.read_bytes()
    return len(unpack(data)) if is_packed(data) else len(data)


@pytest.mark.parametrize("recipe,frozen_dtype", [("bias", "fp32"), ("bias", "int8"), ("lora", "fp32"),
                                                  ("lora", "int8")])
def test_frozen_linear_weights_are_packed_one_way(tmp_path, capfd, recipe, frozen_dtype):
    pm = edgetl.prepare(_mlp(), recipe, num_classes=10, input_shape=(1, 8, 8), frozen_dtype=frozen_dtype)
    t = Trainer.load(export(pm, "executorch", tmp_path / "b", OPT, batch_size=B))
    g = np.random.default_rng(0)
    x, y = g.random((B, 1, 8, 8), dtype=np.float32), g.integers(0, 10, B).astype(np.int64)
    xn = normalize(x, t.bundle.manifest)
    t.backend.train_step(xn, y, OPT.lr)
    step = pm.step_module(OPT)
    params = pm.initial_params()
    _, _, params, _, _ = step.run(torch.from_numpy(xn), torch.from_numpy(y), OPT.lr, params, step.init_state(params))
    got = t.backend.get_state()
    for n in pm.trainable:  # the gradient through the frozen linear is right
        assert np.abs(got[n] - params[n].numpy()).max() <= 1e-4 * max(1.0, float(np.abs(params[n].numpy()).max())), n
    if frozen_dtype == "int8":  # 1 byte per frozen weight in the eval program, not 4 (~15.5k weights, ~13 kB rest)
        frozen = sum(pm.frozen(name).numel() for name in pm.stored)
        assert _program_bytes(t.bundle.root / "eval.pte") < 2 * frozen + 16_000
    t.predict_logits(x)
    del t
    gc.collect()
    err = capfd.readouterr().err  # ExecuTorch's log, from loading to closing the programs
    assert "seed mismatch" not in err and "delete_packed_data" not in err, err[-2000:]
