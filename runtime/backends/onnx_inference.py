"""A trained inference model from an eval program: parameter inputs become initializers and
the bundle's input normalisation is prepended, so the model takes images in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_inference_model(eval_program: bytes, params: dict[str, np.ndarray], manifest: dict, out: Path) -> Path:
    """`eval_program`: the checked bytes of the bundle's eval program (from bytes, onnx reads no
    external data file)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(eval_program)
    g = model.graph
    kept_inputs = [i for i in g.input if i.name not in params]
    del g.input[:]
    g.input.extend(kept_inputs)
    for name, value in params.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    pre = manifest["input"]["preprocess"]
    c = manifest["input"]["shape"][0]
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, c, 1, 1)
    g.initializer.extend([numpy_helper.from_array(mean, "edgetl.mean"), numpy_helper.from_array(std, "edgetl.std")])
    for node in g.node:
        node.input[:] = ["edgetl.x_normalized" if i == "x" else i for i in node.input]
    g.node.insert(0, helper.make_node("Div", ["edgetl.x_centered", "edgetl.std"], ["edgetl.x_normalized"]))
    g.node.insert(0, helper.make_node("Sub", ["x", "edgetl.mean"], ["edgetl.x_centered"]))
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out
