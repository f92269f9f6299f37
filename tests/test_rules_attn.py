"""The transformer rules (LayerNorm / RMSNorm / GroupNorm, GELU, Softmax, matmul of two activations,
scaled_dot_product_attention, linear on tokens, parameters used directly in forward) against torch
autograd of torch's own ops; their q8 / q4 keeps against exact autograd; each rule's forward +
backward exported to ONNX and run in onnxruntime; and the traced patterns they come from."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetl import rules as R
from edgetl.errors import UnsupportedLayerError
from edgetl.rules import Need
from edgetl.trace import trace
from helpers import rel_err


def _t(shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _bind(rule, xs, w):
    meta = [x.to("meta") for x in xs]
    shapes = [tuple(x.shape[1:]) for x in xs]
    y = rule.bind(shapes).compute(meta, {k: v.to("meta") for k, v in w.items()})
    return rule.bind(shapes, tuple(y.shape[1:]))


def _lean(rule, xs, w, g):
    need = Need(tuple(True for _ in xs), frozenset(w))
    y, kept = rule.forward(xs, w, need)
    gxs, gps = rule.backward(g, dict(kept), w, need)
    return y, gxs, gps, kept


def _autograd(ref, xs, w, g):
    xr = [x.clone().requires_grad_(True) for x in xs]
    wr = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    y = ref(*xr, **wr)
    y.backward(g)
    return y.detach(), [x.grad for x in xr], {k: v.grad for k, v in wr.items()}


# name: (rule factory, input shapes (with batch), weights, torch reference (xs..., **weights))
LN_W = {"weight": _t((8,), 5, 0.3) + 1, "bias": _t((8,), 6, 0.2)}
GN_W = {"weight": _t((6,), 5, 0.3) + 1, "bias": _t((6,), 6, 0.2)}
IDX = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(3))  # repeats: the scatter must add


def _rel_bias(table):  # Swin: table[index].view(N, N, H).permute(2, 0, 1)
    return table[IDX].reshape(4, 4, 2).permute(2, 0, 1)


POS = _rel_bias(torch.arange(14).reshape(7, 2))
CASES = {
    "layernorm_tokens": (lambda: R.LayerNorm((8,), 1e-6), [(2, 5, 8)], LN_W,
                         lambda x, weight, bias: F.layer_norm(x, (8,), weight, bias, 1e-6)),
    "layernorm_channels_last": (lambda: R.LayerNorm((8,)), [(2, 3, 4, 8)], LN_W,
                                lambda x, weight, bias: F.layer_norm(x, (8,), weight, bias)),
    "layernorm_two_dims": (lambda: R.LayerNorm((4, 8)), [(2, 3, 4, 8)],
                           {"weight": _t((4, 8), 5, 0.3) + 1, "bias": _t((4, 8), 6, 0.2)},
                           lambda x, weight, bias: F.layer_norm(x, (4, 8), weight, bias)),
    "layernorm_no_affine": (lambda: R.LayerNorm((8,)), [(2, 5, 8)], {}, lambda x: F.layer_norm(x, (8,))),
    "rmsnorm": (lambda: R.LayerNorm((8,), 1e-6, centered=False), [(2, 5, 8)], {"weight": LN_W["weight"]},
                lambda x, weight: F.rms_norm(x, (8,), weight, 1e-6)),
    "groupnorm": (lambda: R.GroupNorm(3), [(2, 6, 4, 5)], GN_W,
                  lambda x, weight, bias: F.group_norm(x, 3, weight, bias)),
    "groupnorm_1d": (lambda: R.GroupNorm(2, 1e-6), [(2, 6, 7)], GN_W,
                     lambda x, weight, bias: F.group_norm(x, 2, weight, bias, 1e-6)),
    "gelu": (R.GELU, [(2, 5, 8)], {}, F.gelu),
    "gelu_tanh": (lambda: R.GELU("tanh"), [(2, 5, 8)], {}, lambda x: F.gelu(x, approximate="tanh")),
    "softmax_last": (lambda: R.Softmax(2), [(2, 2, 5, 5)], {}, lambda x: torch.softmax(x, -1)),
    "softmax_middle": (lambda: R.Softmax(0), [(2, 4, 3)], {}, lambda x: torch.softmax(x, 1)),
    "matmul_qk": (R.MatMul, [(2, 2, 5, 4), (2, 2, 4, 6)], {}, torch.matmul),
    "matmul_4d": (R.MatMul, [(2, 3, 2, 5, 4), (2, 3, 2, 4, 5)], {}, torch.matmul),
    "matmul_broadcast_b": (R.MatMul, [(2, 2, 5, 4), (2, 1, 4, 6)], {}, torch.matmul),
    "attention": (R.Attention, [(2, 2, 5, 4)] * 3, {}, F.scaled_dot_product_attention),
    "attention_scale_kv_len": (lambda: R.Attention(0.3), [(2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 4)], {},
                               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)),
    "attention_causal": (lambda: R.Attention(causal=True), [(2, 2, 5, 4)] * 3, {},
                         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "attention_mobilevit_5d": (R.Attention, [(2, 4, 2, 6, 4)] * 3, {}, F.scaled_dot_product_attention),
    "linear_tokens": (R.Linear, [(2, 5, 8)], {"weight": _t((6, 8), 5), "bias": _t((6,), 6)}, F.linear),
    "linear_4d_tokens": (R.Linear, [(2, 3, 4, 8)], {"weight": _t((6, 8), 5), "bias": _t((6,), 6)}, F.linear),
    "pos_embed": (R.ParamAdd, [(2, 5, 8)], {"param": _t((1, 5, 8), 5)}, lambda x, param: x + param),
    "layer_scale": (R.ParamMul, [(2, 5, 8)], {"param": _t((8,), 5)}, lambda x, param: x * param),
    "layer_scale_channels_last": (R.ParamMul, [(2, 3, 4, 8)], {"param": _t((8,), 5)}, lambda x, param: x * param),
    "cls_token": (lambda: R.ParamConcat(0), [(2, 5, 8)], {"param": _t((1, 1, 8), 5)},
                  lambda x, param: torch.cat((param.expand(x.shape[0], -1, -1), x), 1)),
    "token_after": (lambda: R.ParamConcat(0, first=False), [(2, 5, 8)], {"param": _t((1, 2, 8), 5)},
                    lambda x, param: torch.cat((x, param.expand(x.shape[0], -1, -1)), 1)),
    "rel_pos_bias": (lambda: R.ParamTableAdd(POS), [(2, 2, 4, 4)], {"param": _t((7, 2), 5)},
                     lambda x, param: x + _rel_bias(param)),
    "table_scale": (lambda: R.ParamTableMul(POS), [(2, 2, 4, 4)], {"param": _t((7, 2), 5)},
                    lambda x, param: x * _rel_bias(param)),
    "ladder_gate": (R.LadderGate, [(2, 5, 8), (2, 5, 8)], {"gate": _t((1,), 5)},
                    lambda s, z, gate: torch.sigmoid(gate) * s + (1 - torch.sigmoid(gate)) * z),
    "ladder_gate_per_channel": (R.LadderGate, [(2, 3, 4, 8), (2, 3, 4, 8)], {"gate": _t((8,), 5)},
                                lambda s, z, gate: torch.sigmoid(gate) * s + (1 - torch.sigmoid(gate)) * z),
}


def _case(name):
    make, shapes, w, ref = CASES[name]
    xs = [_t(s, i) for i, s in enumerate(shapes)]
    rule = _bind(make(), xs, w)
    g = _t(ref(*xs, **w).shape, 9)
    return rule, xs, w, ref, g


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_autograd_for_inputs_and_parameters(name):
    rule, xs, w, ref, g = _case(name)
    yr, gxr, gwr = _autograd(ref, xs, w, g)
    y, gxs, gps, _ = _lean(rule, xs, w, g)
    assert y.shape == yr.shape and rel_err(y, yr) < 1e-5
    for got, want in zip(gxs, gxr):
        assert rel_err(got, want) < 1e-5
    assert set(gps) == set(w)
    for k in w:
        assert gps[k].shape == w[k].shape and rel_err(gps[k], gwr[k]) < 1e-5, k


def _kept(name, need):
    rule, xs, w, _, _ = _case(name)
    return rule.forward(xs, w, need)[1]


def test_what_each_rule_keeps():
    both, none_in = Need((True,), frozenset({"weight", "bias"})), Need((False,), frozenset({"bias"}))
    assert set(_kept("layernorm_tokens", both)) == {"xhat", "rstd"}
    assert _kept("layernorm_tokens", none_in) == {}  # the shift's gradient needs nothing
    assert set(_kept("layernorm_tokens", Need((False,), frozenset({"weight"})))) == {"xhat"}
    assert set(_kept("gelu", Need((True,), frozenset()))) == {"v"}
    assert set(_kept("softmax_last", Need((True,), frozenset()))) == {"p"}
    assert set(_kept("attention", Need((True, True, True), frozenset()))) == {"p", "q", "k", "v"}
    assert set(_kept("attention", Need((False, False, True), frozenset()))) == {"p"}
    assert set(_kept("matmul_qk", Need((True, False), frozenset()))) == {"b"}
    assert _kept("pos_embed", Need((True,), frozenset({"param"}))) == {}
    assert set(_kept("layer_scale", Need((True,), frozenset({"param"})))) == {"x"}
    assert _kept("layer_scale", Need((True,), frozenset())) == {}
    assert _kept("rel_pos_bias", Need((True,), frozenset({"param"}))) == {}  # only the constant positions
    assert set(_kept("table_scale", Need((True,), frozenset({"param"})))) == {"x"}
    assert set(_kept("ladder_gate", Need((True, True), frozenset({"gate"})))) == {"diff"}  # s - z, one tensor
    assert _kept("ladder_gate", Need((True, True), frozenset())) == {}


QUANT = {"gelu": 0.02, "softmax_last": 0.02, "attention": 0.03, "layernorm_tokens": 0.03, "groupnorm": 0.03}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(QUANT))
def test_quantized_keep_is_close_to_exact_and_stores_bytes(name, bits):
    make, shapes, w, ref = CASES[name]
    xs = [_t(s, i) for i, s in enumerate(shapes)]
    exact = _bind(make(), xs, w)
    rule = _bind(make().replace(quant_bits=bits), xs, w)
    g = _t(ref(*xs, **w).shape, 9)
    _, gx_exact, gw_exact = _autograd(ref, xs, w, g)
    y, gxs, gps, kept = _lean(rule, xs, w, g)
    assert rel_err(y, exact.compute(xs, w)) < 1e-6  # the forward stays exact
    tol = QUANT[name] * (1 if bits == 8 else 16)
    for got, want in zip(gxs, gx_exact):
        assert 0 < rel_err(got, want) < tol
    for k in w:
        assert rel_err(gps[k], gw_exact[k]) < tol
    codes = [v for v in kept.values() if v.dtype == torch.uint8]
    assert codes and not ({"p", "xhat"} & set(kept)) and (name != "gelu" or "v" not in kept), kept.keys()
    # the reference the family tests compare whole steps against runs the same backward
    xr = [x.clone().requires_grad_(True) for x in xs]
    rule.reference(xr, w).backward(g)
    for got, want in zip(gxs, xr):
        assert rel_err(got, want.grad) < 1e-6


def _onnx_roundtrip(rule, xs, w, g):
    class Step(nn.Module):
        def forward(self, *args):
            ins, gg = list(args[:-1]), args[-1]
            y, gxs, gps, _ = _lean(rule, ins, w, gg)
            return (y, *gxs, *(gps[k] for k in sorted(gps)))

    step = Step().eval()
    buf = io.BytesIO()
    names = [f"x{i}" for i in range(len(xs))] + ["g"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (*xs, g), buf, input_names=names, opset_version=17, do_constant_folding=False,
                          dynamo=False)
    got = ort.InferenceSession(buf.getvalue()).run(None, {n: t.numpy() for n, t in zip(names, [*xs, g])})
    for a, b in zip(got, step(*xs, g)):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_rule_exports_to_onnx_and_runs_in_onnxruntime(name):
    rule, xs, w, _, g = _case(name)
    _onnx_roundtrip(rule, xs, w, g)


@pytest.mark.parametrize("name", ["softmax_last", "attention", "layernorm_tokens"])
def test_quantized_rule_exports_to_onnx(name):
    make, shapes, w, ref = CASES[name]
    xs = [_t(s, i) for i, s in enumerate(shapes)]
    rule = _bind(make().replace(quant_bits=4), xs, w)
    _onnx_roundtrip(rule, xs, w, _t(ref(*xs, **w).shape, 9))


# ---- what the tracer makes of the patterns transformers write ---------------------------------------

class _TimmAttention(nn.Module):
    """qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0): the permute moves the batch."""

    def __init__(self, dim=8, heads=2, bias_table=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 3)
        self.bias_table = bias_table
        if bias_table:  # a relative position bias gathered from a table by a constant index (Swin)
            self.table = nn.Parameter(torch.randn(7, heads))
            self.register_buffer("index", torch.randint(0, 7, (4 * 4,)))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        s = (q * 0.5) @ k.transpose(-2, -1)
        if self.bias_table:
            s = s + self.table[self.index].reshape(4, 4, self.heads).permute(2, 0, 1)
        x = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head(x.mean(1))


def test_timm_qkv_split_moving_the_batch_traces_to_selects():
    m = _TimmAttention().eval()
    g = trace(m, (4, 8))
    kinds = [n.rule.kind for n in g.nodes]
    assert kinds.count("select") == 3 and "softmax" in kinds and "matmul" in kinds
    x = _t((2, 4, 8))
    from edgetl.interpret import computing, interpret
    y = interpret(g, x, computing(lambda n: {r: g.tensors[t] for r, t in n.params.items()}))
    assert rel_err(y, m(x)) < 1e-5


def test_relative_position_bias_from_a_table_trains_under_full_only():
    import edgetl
    from edgetl.optim import OptimizerConfig
    from helpers import lean_vs_reference

    m = _TimmAttention(bias_table=True).eval()
    g = trace(m, (4, 8))
    node = next(n for n in g.nodes if n.rule.kind == "param_table_add")
    assert node.params == {"param": "table"} and g.tensors["table"].shape == (7, 2)  # the table in its own shape
    assert not any(isinstance(n.rule, R.ConstOp) and isinstance(n.rule.other, torch.Tensor) for n in g.nodes)
    pm = edgetl.prepare(m, "full", num_classes=3, input_shape=(4, 8))
    assert "table" in pm.trainable
    gerr, perr = lean_vs_reference(pm, _t((2, 4, 8)), torch.tensor([0, 2]), OptimizerConfig.make("sgd", lr=0.1))
    assert gerr["table"] < 1e-5 and max(perr.values()) < 1e-5
    assert "table" not in edgetl.prepare(m, "bias", num_classes=3, input_shape=(4, 8)).trainable


def test_a_table_scaled_by_arithmetic_in_forward_stays_a_frozen_constant():
    class Scaled(_TimmAttention):
        def forward(self, x):
            q = self.qkv(x)[..., :8]
            return self.head((q + self.table[self.index].reshape(4, 4, 2).permute(1, 0, 2).reshape(4, 8) * 2).mean(1))

    g = trace(Scaled(bias_table=True).eval(), (4, 8))
    assert not any(n.rule.kind.startswith("param_") for n in g.nodes)
    assert any(isinstance(n.rule, R.ConstOp) and isinstance(n.rule.other, torch.Tensor) for n in g.nodes)


class _Direct(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 4, 8))
        self.gamma = nn.Parameter(torch.randn(8))
        self.register_buffer("frozen_shift", torch.randn(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.proj(x) + self.pos
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), 1) * self.gamma + self.frozen_shift
        return self.head(x[:, 0])


def test_parameters_used_directly_become_parameter_nodes_and_buffers_stay_constant():
    g = trace(_Direct().eval(), (4, 4))
    by_kind = {n.rule.kind: n for n in g.nodes}
    assert by_kind["param_add"].params == {"param": "pos"} and g.tensors["pos"].shape == (1, 4, 8)
    assert by_kind["param_concat"].params == {"param": "cls"} and g.tensors["cls"].shape == (1, 1, 8)
    assert by_kind["param_mul"].params == {"param": "gamma"}
    assert by_kind["const_op"].params == {}  # the buffer


def test_masked_attention_is_reported_as_unsupported():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.register_buffer("mask", torch.rand(4, 4) > 0.5)

        def forward(self, x):
            q = x.unsqueeze(1)
            return self.head(F.scaled_dot_product_attention(q, q, q, attn_mask=self.mask).mean((1, 2)))

    with pytest.raises(UnsupportedLayerError, match="mask"):
        trace(Masked().eval(), (4, 8))


class _GroupAndRmsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.gn = nn.GroupNorm(3, 6)
        self.rms = nn.RMSNorm(6)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.2, 0.2)
            self.rms.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.gn(self.conv(x)).mean((2, 3)).unsqueeze(1)
        return self.fc(self.rms(x)[:, 0])


def test_group_and_rms_norm_trace_and_train_with_the_norm_recipe():
    import edgetl
    from edgetl.optim import OptimizerConfig
    from helpers import lean_vs_reference

    pm = edgetl.prepare(_GroupAndRmsNorm().eval(), "norm", num_classes=3, input_shape=(3, 8, 8))
    assert {n.rule.kind for n in pm.graph.nodes} >= {"groupnorm", "rmsnorm"}
    assert pm.trainable == ["gn.weight", "gn.bias", "rms.weight", "head.weight", "head.bias"]
    gerr, perr = lean_vs_reference(pm, _t((2, 3, 8, 8)), torch.tensor([0, 2]), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5 and max(perr.values()) < 1e-5
