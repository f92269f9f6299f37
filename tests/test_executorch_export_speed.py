"""The `executorch` export skips XNNPACK's identity re-traces and ExecuTorch's identity
decompositions (exporters/et_retrace.py), recompiles graph modules lazily and shares node
provenance (exporters/et_fast.py), and still writes the same programs, byte for byte, as
ExecuTorch's own lowering."""
import contextlib

import pytest
import torch
import torch.nn as nn

pytest.importorskip("executorch")

import edgetl  # noqa: E402
import edgetl.exporters.executorch as et  # noqa: E402
from edgetl.exporters import export  # noqa: E402
from edgetl.optim import OptimizerConfig  # noqa: E402


def _cnn() -> nn.Module:
    """ReLU6 (masked), SiLU (kept exact, a delegate of its own in the backward), a residual add."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU())
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = self.a(x)
            x = x + self.b(x)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval()


def _programs(root, counts=None) -> dict:
    pm = edgetl.prepare(_cnn(), "bias+mask", num_classes=4, input_shape=(3, 8, 8))
    out = export(pm, "executorch", root, OptimizerConfig.make("sgd", lr=0.05), batch_size=2)
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.pte"))}


@pytest.mark.slow
def test_skipping_identity_retraces_writes_the_same_programs(tmp_path, monkeypatch):
    counts: dict = {}
    retraces, decompositions = et.skip_identity_retraces, et.skip_identity_decompositions
    monkeypatch.setattr(et, "skip_identity_retraces", lambda: retraces(counts))
    monkeypatch.setattr(et, "skip_identity_decompositions", lambda: decompositions(counts))
    fast = _programs(tmp_path / "fast")
    assert counts["skipped"] > counts["retraced"] > 0, counts
    assert counts["decompositions_skipped"] >= 2 and counts["decomposed"] > 0, counts  # >= one per program
    monkeypatch.setattr(et, "skip_identity_retraces", lambda: contextlib.nullcontext())
    monkeypatch.setattr(et, "skip_identity_decompositions", lambda: contextlib.nullcontext())
    monkeypatch.setattr(et, "lazy_recompiles", lambda: contextlib.nullcontext())
    monkeypatch.setattr(et, "shared_provenance", lambda: contextlib.nullcontext())
    monkeypatch.setattr(et, "materialize_cia_ops_once", lambda: contextlib.nullcontext())
    slow = _programs(tmp_path / "slow")
    assert fast.keys() == slow.keys() == {"train_step.pte", "eval.pte"}
    assert fast == slow
