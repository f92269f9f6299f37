"""ONNX Runtime's `generate_artifacts` on a forward model: training, eval and optimizer models and a
checkpoint. Standalone (imports neither torch nor edgetl) so that it also runs as a script in the
ort-training peer Python (see edgetl.runtime.backends.ort_peer):

    python ort_artifacts.py SPEC.json    # {"model", "out", "requires_grad", "frozen", "optimizer", "outputs"}
"""
from __future__ import annotations

import json
import os
import sys
import types
import warnings


def generate(model: str, out: str, requires_grad: list[str], frozen: list[str], optimizer: dict,
             outputs: list[str]) -> None:
    """`outputs`: the forward model's outputs the training and eval models return beside the loss.
    `optimizer`: {"name": "sgd"} or {"name": "adamw", "beta1", "beta2", "eps", "weight_decay"}."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock

    onnxruntime.set_default_logger_severity(3)
    if optimizer["name"] == "adamw":
        opt = onnxblock.optim.AdamW(bias_correction=True, betas=(optimizer["beta1"], optimizer["beta2"]),
                                    eps=optimizer["eps"], weight_decay=optimizer["weight_decay"])
    else:
        opt = artifacts.OptimType.SGD
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifacts.generate_artifacts(onnx.load(model), requires_grad=requires_grad, frozen_params=frozen,
                                     loss=artifacts.LossType.CrossEntropyLoss, optimizer=opt,
                                     artifact_directory=out, additional_output_names=outputs)


def _without_torch() -> None:
    """Make `onnxruntime.training` a bare package: its __init__ imports torch (for ORTModule),
    which the peer lacks; `artifacts` and `onnxblock` need only onnx."""
    import onnxruntime

    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
    sys.modules["onnxruntime.training"] = pkg


if __name__ == "__main__":
    _without_torch()
    with open(sys.argv[1]) as f:
        generate(**json.load(f))
