"""Run one rule by hand (bind, forward, backward), as the lean step does, without a tracer."""
from __future__ import annotations

import torch

from edgetl.rules import Need, Rule


def bind(rule: Rule, x: torch.Tensor, w: dict[str, torch.Tensor] | None = None) -> Rule:
    """Bind `rule` to x's per-sample shape, and its output's, as LeanGraph.infer_shapes does."""
    w = w or {}
    meta = x.to("meta")
    y = rule.bind([tuple(x.shape[1:])]).compute([meta], {k: v.to("meta") for k, v in w.items()})
    return rule.bind([tuple(x.shape[1:])], tuple(y.shape[1:]))


def lean_grads(rule: Rule, x: torch.Tensor, g: torch.Tensor, w: dict[str, torch.Tensor] | None = None,
               params: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(y, dL/dx, parameter grads, kept) of the lean rule for dL/dy = g."""
    w = w or {}
    need = Need((True,), params)
    y, kept = rule.forward([x], w, need)
    (gx,), gp = rule.backward(g, dict(kept), w, need)
    return y, gx, gp, kept


class RuleStep(torch.nn.Module):
    """One rule's forward and backward as a module (what the exporters trace): (x, g) -> (y, dL/dx)."""

    def __init__(self, rule: Rule, w: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.rule, self.w = rule, w or {}

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        need = Need((True,), frozenset())
        y, kept = self.rule.forward([x], self.w, need)
        (gx,), _ = self.rule.backward(g, kept, self.w, need)
        return y, gx


def rule_step(rule: Rule, x: torch.Tensor, w: dict[str, torch.Tensor] | None = None):
    """(RuleStep in eval, x, a seeded incoming gradient g) for one rule bound to x."""
    w = w or {}
    rule = bind(rule, x, w)
    g = torch.randn(rule.compute([x], w).shape, generator=torch.Generator().manual_seed(3))
    return RuleStep(rule, w).eval(), x, g


def assert_onnx_runs_like_torch(step: RuleStep, x: torch.Tensor, g: torch.Tensor, y_atol: float, gx_atol: float):
    """The rule's step exported to ONNX gives torch's (y, dL/dx) in onnxruntime."""
    import io
    import warnings

    import numpy as np
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (x, g), buf, input_names=["x", "g"], output_names=["y", "gx"], opset_version=17,
                          do_constant_folding=False, dynamo=False)
    y, gx = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy(), "g": g.numpy()})
    yt, gt = step(x, g)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-5, atol=y_atol)
    np.testing.assert_allclose(gx, gt.numpy(), rtol=1e-5, atol=gx_atol)


def assert_torch_export_without_scatter(step: RuleStep, x: torch.Tensor, g: torch.Tensor, y_atol: float,
                                        gx_atol: float):
    """The rule's step lowers with torch.export to core ATen without scatter/index ops (ExecuTorch
    and XNNPACK run those slowly or not at all) and computes the same."""
    ep = torch.export.export(step, (x, g), strict=False).run_decompositions({})
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if "scatter" in o or "index" in o], ops
    y, gx = ep.module()(x, g)
    yt, gt = step(x, g)
    assert torch.allclose(y, yt, atol=y_atol) and torch.allclose(gx, gt, atol=gx_atol)


class _Steps(torch.nn.Module):
    """Several rule steps as one module: (x1, g1, x2, g2, ...) -> (y1, gx1, y2, gx2, ...)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = torch.nn.ModuleList(steps)

    def forward(self, *xg):
        return tuple(t for i, s in enumerate(self.steps) for t in s(xg[2 * i], xg[2 * i + 1]))


def assert_executorch_runs_like_torch(built: list, path) -> None:
    """Rule steps `built` ((step, x, g) each) lowered together to one ExecuTorch program on its own
    kernels, written to `path`, and run by its C++ runtime give torch's (y, dL/dx) for each."""
    import numpy as np

    from edgetl.exporters.executorch import _lower
    from edgetl.runtime.backends.executorch import NativeMethod

    module = _Steps([b[0] for b in built]).eval()
    args = tuple(t for _, x, g in built for t in (x, g))
    path.write_bytes(_lower(module, args, delegate=False).buffer)
    outs = NativeMethod(path)([a.numpy() for a in args])
    for got, want in zip(outs, module(*args)):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
