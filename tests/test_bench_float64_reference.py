"""bench/float64_reference.py's summary of errors against the float64 step."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from float64_reference import summary  # noqa: E402


def test_summary_skips_groups_with_no_tensors():
    """A recipe with no trainable conv biases (`--recipe head`) has no conv bias momenta to summarize."""
    errs = {"head.weight": 2e-7, "head.bias": 1e-7, "momentum:head.weight": 3e-7, "momentum:head.bias": 1e-7}
    out = summary(errs, set())
    assert set(out) == {"all momenta", "parameters"}
    assert out["all momenta"] == {"median": 2e-7, "max": 3e-7, "worst": "momentum:head.weight"}
    assert out["parameters"]["worst"] == "head.weight"
