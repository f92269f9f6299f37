"""The onnx exporter's graph rewrites: TF-same (asymmetric) padding runs as the Conv's own pads, no Pad copy,
and the input gradient's crop as the ConvTranspose's pads, no Slice copies; depthwise kernels int8 in the bundle,
fp32 constants once the runtime has loaded them;
scalars broadcast at the other operand's rank (onnxruntime's slow path for (O, I, 1, 1) weights)."""
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import edgetl
from edgetl.exporters import export
from edgetl.runtime import Trainer
from edgetl.runtime.backends.onnx import session_options


def _tf_same_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.ReLU6(),  # TF "same", stride 2
        nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    net.input_shape = (3, 16, 16)
    return net.eval()


def _tf_same_pointwise_net() -> nn.Module:
    net = _tf_same_net()
    net.insert(8, nn.Conv2d(16, 12, 1))  # a pointwise weight (O, I, 1, 1) for the optimizer's scalars
    net[-1] = nn.Linear(12, 10)
    return net


def _depthwise_kernels(g) -> set[int]:
    """The element types of the constants the grouped (depthwise) convs of graph `g` take their kernel
    from: an initializer, or a DequantizeLinear of constants only (initializers, Constant nodes). Any
    group count: onnxruntime's NCHWc layout pads the 8 channels to its block (16 with AVX-512)."""
    consts = {i.name: i.data_type for i in g.initializer}
    made = {n.output[0]: n for n in g.node}
    consts |= {o: n.attribute[0].t.data_type for o, n in made.items() if n.op_type == "Constant"}
    out = set()
    for n in g.node:
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute):
            w = n.input[1]
            if w in consts:
                out.add(consts[w])
            elif made[w].op_type == "DequantizeLinear" and all(i in consts for i in made[w].input if i):
                out.add(consts[made[w].input[0]])
            else:
                out.add(-1)  # computed from data
    return out


def _steps_match_torch(pm, opt, bundle) -> None:
    rng = np.random.default_rng(0)
    batches = [(rng.random((4, 3, 16, 16), dtype=np.float32), rng.integers(0, 4, 4)) for _ in range(3)]
    step = pm.step_module(opt)
    params = pm.initial_params()
    state = step.init_state(params)
    t = Trainer.load(bundle)
    for x, y in batches:
        _, _, params, state, _ = step.run(torch.from_numpy(t._x(x)), torch.from_numpy(y), opt.lr, params, state)
        t._train_step(t._x(x), y.astype(np.int64))
    got = t.backend.get_state()
    for name in pm.trainable:
        ref = params[name].numpy()
        assert np.abs(got[name] - ref).max() <= 1e-4 * (np.abs(ref).max() + 1e-12), name


def test_scalars_broadcast_at_full_rank_and_full_fine_tuning_matches_torch(tmp_path):
    """`full` with momentum: the update's scalars meet 4-D weights (rank-matched by the pass), and the
    weight gradients of strided, TF-same, depthwise and pointwise convs run in onnxruntime."""
    pm = edgetl.prepare(_tf_same_pointwise_net(), "full", num_classes=4, input_shape=(3, 16, 16))
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9)
    bundle = export(pm, "onnx", tmp_path / "b", opt, batch_size=4)
    g = onnx.shape_inference.infer_shapes(onnx.load(bundle / "train_step.onnx")).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.value_info]}
    shapes |= {i.name: list(i.dims) for i in g.initializer}
    assert any(len(s) == 4 and s[2:] == [1, 1] for s in shapes.values())  # the pointwise weight is there
    lower_rank_scalars = [n.name for n in g.node if n.op_type in ("Add", "Sub", "Mul", "Div")
                          for a, b in [[shapes.get(i) for i in n.input]] if a is not None and b is not None
                          and min(len(a), len(b)) < max(len(a), len(b)) >= 2
                          and all(d == 1 for d in min(a, b, key=len))]
    assert not lower_rank_scalars
    _steps_match_torch(pm, opt, bundle)


def test_asymmetric_pads_fold_into_conv_and_the_step_still_matches_torch(tmp_path):
    pm = edgetl.prepare(_tf_same_net(), "bias+mask", num_classes=4, input_shape=(3, 16, 16))
    opt = edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.0)
    bundle = export(pm, "onnx", tmp_path / "b", opt, batch_size=4)
    for program in ("train_step", "eval"):
        g = onnx.load(bundle / f"{program}.onnx").graph
        assert not [n.name for n in g.node if n.op_type == "Pad"], program
        pads = [list(a.ints) for n in g.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
        assert [0, 0, 1, 1] in pads and [1, 1, 2, 2] in pads, (program, pads)
        # the depthwise kernel is int8 in the file, dequantized from constants only (nothing made from data
        # pins it), and the runtime's session folds it to an fp32 constant (onnxruntime's NCHWc kernels)
        assert _depthwise_kernels(g) == {onnx.TensorProto.INT8}, program
        opts = session_options()
        opts.optimized_model_filepath = str(tmp_path / f"{program}.opt.onnx")
        ort.InferenceSession(str(bundle / f"{program}.onnx"), opts)
        assert _depthwise_kernels(onnx.load(opts.optimized_model_filepath).graph) == {onnx.TensorProto.FLOAT}
    # the stride-2 convs' input gradients: each one ConvTranspose with the TF-same crop as its pads
    g = onnx.load(bundle / "train_step.onnx").graph
    users = {i: n.op_type for n in g.node for i in n.input}
    cts = [n for n in g.node if n.op_type == "ConvTranspose"]
    assert sorted(list(a.ints) for n in cts for a in n.attribute if a.name == "pads") == [[0, 0, 1, 1], [1, 1, 2, 2]]
    assert all(users[n.output[0]] != "Slice" for n in cts)

    _steps_match_torch(pm, opt, bundle)
