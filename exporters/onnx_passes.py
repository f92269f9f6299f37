"""Small rewrites of an exported ONNX graph that torch's exporter cannot express."""
from __future__ import annotations

import onnx
from onnx import numpy_helper


def fuse_pad_into_conv(model: onnx.ModelProto) -> int:
    """Fold a zero Pad (spatial only, constant pads) into the Conv that alone consumes it:
    ONNX Conv takes asymmetric pads, torch's conv2d cannot. Returns how many were folded."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:  # constants, and casts of constants (how torch emits F.pad's pads)
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Cast" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
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
        if pad.input[1] not in consts or (len(pad.input) > 2 and pad.input[2] and
                                          (pad.input[2] not in consts or consts[pad.input[2]].any())):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue
        pads = [int(v) for v in consts[pad.input[1]]]
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
    return len(folded)
