"""Small rewrites of an exported ONNX graph that torch's exporter cannot express."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Shape arithmetic torch's exporter emits around constants (F.pad's pads become a chain of these
# when constant folding is off, as it must be to keep the frozen weights int8).
_SHAPE_OPS = {"Cast", "Concat", "ConstantOfShape", "Gather", "Mul", "Reshape", "Shape", "Slice", "Squeeze",
              "Sub", "Add", "Transpose", "Unsqueeze"}
_SMALL = 64  # elements: pads and shapes, never a weight


class _Constants:
    """Values of the graph that are small constants: initializers, Constant nodes and the shape
    arithmetic on them, evaluated on demand (onnx's reference evaluator, one node at a time)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.values = {i.name: numpy_helper.to_array(i) for i in g.initializer if np.prod(i.dims) <= _SMALL}
        self.producer = {o: n for n in g.node for o in n.output}
        self.opset = model.opset_import

    def get(self, name: str) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        n = self.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Constant":
            a = n.attribute[0] if n.attribute else None
            value = numpy_helper.to_array(a.t) if a is not None and a.name == "value" else None
        elif n.op_type in _SHAPE_OPS:
            ins = [self.get(i) if i else None for i in n.input]
            if any(i and v is None for i, v in zip(n.input, ins)):
                return None
            value = self._run(n, ins)
        else:
            return None
        if value is None or value.size > _SMALL:
            return None
        self.values[name] = value
        return value

    def _run(self, node: onnx.NodeProto, ins: list) -> np.ndarray | None:
        from onnx.reference import ReferenceEvaluator

        names = [f"in{k}" if i else "" for k, i in enumerate(node.input)]
        one = onnx.helper.make_node(node.op_type, names, ["out"], **{
            a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        graph = onnx.helper.make_graph(
            [one], "c", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names if n],
            [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)])
        try:
            out = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=self.opset)).run(
                None, {n: v for n, v in zip(names, ins) if n})
        except Exception:  # an op the reference cannot run here: leave the graph as it is
            return None
        return np.asarray(out[0])


def fuse_pad_into_conv(model: onnx.ModelProto) -> int:
    """Fold a zero Pad (spatial only, constant pads) into the Conv that alone consumes it:
    ONNX Conv takes asymmetric pads, torch's conv2d cannot (TF-same padding of stride-2 convs).
    Saves the padded copy of the input. Returns how many were folded."""
    g = model.graph
    consts = _Constants(model)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    folded = []
    for pad in g.node:
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        cons = users.get(pad.output[0], [])
        if mode != "constant" or len(cons) != 1 or cons[0].op_type != "Conv" or cons[0].input[0] != pad.output[0]:
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = consts.get(pad.input[2])
            if value is None or value.any():
                continue
        if len(pad.input) > 3 and pad.input[3]:
            continue
        pads_value = consts.get(pad.input[1])
        if pads_value is None:
            continue
        pads = [int(v) for v in pads_value.reshape(-1)]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            continue
        conv = cons[0]
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        if attr is None:
            conv.attribute.append(onnx.helper.make_attribute("pads", new))
        else:
            del attr.ints[:]
            attr.ints.extend(new)
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)
    _drop_dead(model)
    return len(folded)


def crop_into_conv_transpose(model: onnx.ModelProto) -> int:
    """Fold the spatial crop (Slices with constant starts/ends, steps 1) that alone consumes a
    ConvTranspose into its pads: ONNX ConvTranspose takes asymmetric pads, torch's conv_transpose2d
    cannot (the input gradient of a TF-same padded stride-2 conv). Saves the uncropped output and
    the crop's copies; measured in onnxruntime 1.32, one thread, Lite0's 3x3/s2 depthwise 96ch
    56->112 at batch 8: 87 -> 46 ms. Returns how many ConvTransposes took a crop."""
    g = model.graph
    consts = _Constants(model)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.output] if v.type.tensor_type.HasField("shape")}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    removed: list[onnx.NodeProto] = []
    count = 0
    for ct in g.node:
        if ct.op_type != "ConvTranspose" or any(a.name in ("output_shape", "auto_pad") for a in ct.attribute):
            continue
        shape = shapes.get(ct.output[0])
        if shape is None or len(shape) != 4 or None in shape[2:]:
            continue
        crop = {2: [0, shape[2]], 3: [0, shape[3]]}  # per spatial axis: [start, end] in the full output
        chain, out = [], ct.output[0]
        while out not in outputs and len(users.get(out, [])) == 1 and users[out][0].op_type == "Slice":
            sl = users[out][0]
            if sl.input[0] != out:
                break
            vals = [consts.get(i) if i else None for i in sl.input[1:]]
            if any(i and v is None for i, v in zip(sl.input[1:], vals)) or len(vals) < 3 or vals[2] is None:
                break
            starts, ends, axes = (v.reshape(-1).tolist() for v in vals[:3])
            steps = vals[3].reshape(-1).tolist() if len(vals) > 3 and vals[3] is not None else [1] * len(axes)
            axes = [a + 4 if a < 0 else a for a in axes]
            ok = all(a in crop and st == 1 for a, st in zip(axes, steps))
            for a, b, e in zip(axes, starts, ends):
                n_ = crop[a][1] - crop[a][0]
                ok = ok and 0 <= b <= n_ and b < min(e, n_)
            if not ok:
                break
            for a, b, e in zip(axes, starts, ends):
                crop[a] = [crop[a][0] + b, crop[a][0] + min(e, crop[a][1] - crop[a][0])]
            chain.append(sl)
            out = sl.output[0]
        if not chain:
            continue
        attr = next((a for a in ct.attribute if a.name == "pads"), None)
        old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
        new = [old[0] + crop[2][0], old[1] + crop[3][0],
               old[2] + shape[2] - crop[2][1], old[3] + shape[3] - crop[3][1]]
        if attr is None:
            ct.attribute.append(onnx.helper.make_attribute("pads", new))
        else:
            del attr.ints[:]
            attr.ints.extend(new)
        ct.output[0] = out
        removed.extend(chain)
        count += 1
    for n in removed:
        g.node.remove(n)
    _drop_dead(model)
    return count


_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div"}


def rank_match_scalars(model: onnx.ModelProto) -> int:
    """Give a scalar operand of Add/Sub/Mul/Div the other operand's rank ([] -> [1, 1, 1, 1]).
    onnxruntime (1.19-1.32, CPU) broadcasts a lower-rank scalar against a tensor whose last dims
    are 1 (a 1x1 conv's weight, (O, I, 1, 1)) element by element, ~50x slower than a same-rank
    one: the optimizer's `momentum * buf` and `lr * buf` on pointwise weights were a quarter of
    `full`'s step. Returns how many operands were reshaped."""
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes: dict[str, list[int | None]] = {}
    for v in [*inferred.input, *inferred.value_info, *inferred.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
    reshaped: dict[tuple[str, int], str] = {}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for k, n in enumerate(g.node):
        if n.op_type not in _BROADCAST_OPS or len(n.input) != 2:
            continue
        a, b = (shapes.get(i) for i in n.input)
        if a is None or b is None:
            continue
        for j, (small, big) in enumerate(((a, b), (b, a))):
            if len(small) >= len(big) or len(big) < 2 or any(d != 1 for d in small):
                continue
            key = (n.input[j], len(big))
            if key not in reshaped:
                shape_name = f"rank_match_shape_{len(big)}"
                if shape_name not in shapes:
                    g.initializer.append(numpy_helper.from_array(np.ones(len(big), np.int64), shape_name))
                    shapes[shape_name] = [len(big)]
                out = f"{n.input[j]}_rank{len(big)}"
                new_nodes.setdefault(k, []).append(onnx.helper.make_node("Reshape", [n.input[j], shape_name], [out]))
                reshaped[key] = out
            n.input[j] = reshaped[key]
    for k in sorted(new_nodes, reverse=True):  # each Reshape just before its first user
        for node in reversed(new_nodes[k]):
            g.node.insert(k, node)
    return len(reshaped)


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (the folded pads' shape arithmetic)."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)
