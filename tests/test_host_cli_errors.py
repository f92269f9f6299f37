"""The host CLI's errors users can cause (issue 14, "clear errors"): one line on stderr, exit 2,
naming the problem, instead of a torch traceback or a silent default."""
import pytest

from edgetl import OptimizerConfig
from edgetl.cli import main
from edgetl.errors import EdgeTLError
from edgetl.exporters import export
from edgetl.prepared import prepare

PLAN = ["plan", "--recipe", "bias", "--num-classes", "10"]


def _error(capsys, argv, *words) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and out == "", (argv, rc, err)
    assert lines[0].startswith("edgetl: error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], (argv, w, lines[0])
    return lines[0]


@pytest.mark.parametrize("model, smallest", [("mnist_cnn", 24), ("efficientnet_lite0", 32)])
def test_an_input_size_too_small_names_the_smallest(capsys, model, smallest):
    for size in (3, smallest - 1):
        _error(capsys, [PLAN[0], model, *PLAN[1:], "--input-size", str(size)],
               f"input_size {size} is too small for {model}", f"smallest input is {smallest}×{smallest}")
    prepare(model, "bias", 10, input_size=smallest)  # and the smallest works


def test_an_input_size_too_small_in_export(capsys, tmp_path):
    _error(capsys, ["export", "mnist_cnn", *PLAN[1:], "--input-size", "3", "--target", "onnx",
                    "--out", str(tmp_path / "b")], "smallest input is 24×24")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


@pytest.mark.parametrize("size", ["0", "-1"])
def test_input_size_zero_is_not_the_default(capsys, size):
    _error(capsys, [PLAN[0], "mnist_cnn", *PLAN[1:], "--input-size", size], f"got {size}")
    with pytest.raises(EdgeTLError, match="positive"):
        prepare("mnist_cnn", "bias", 10, input_size=0)


@pytest.mark.parametrize("momentum", ["5", "-1", "1", "nan"])
def test_momentum_outside_zero_one_is_refused(capsys, momentum):
    _error(capsys, [PLAN[0], "mnist_cnn", *PLAN[1:], "--momentum", momentum], "momentum must lie in [0, 1)")
    with pytest.raises(EdgeTLError, match="momentum"):
        OptimizerConfig.make("sgd", 0.1, momentum=float(momentum))
    assert OptimizerConfig.make("sgd", 0.1, momentum=0.0).momentum == 0.0


def test_export_out_an_existing_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    _error(capsys, ["export", "mnist_cnn", *PLAN[1:], "--target", "onnx", "--out", str(f)], "existing file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("out", [".", "", "..", "CWD"])
def test_export_out_the_current_directory(capsys, tmp_path, monkeypatch, out):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    out = str(here) if out == "CWD" else out
    _error(capsys, ["export", "mnist_cnn", *PLAN[1:], "--target", "onnx", "--out", out], "is the current directory")
    with pytest.raises(EdgeTLError, match="is the current directory"):
        export(prepare("mnist_cnn", "bias", 10), "onnx", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(here.iterdir())


def test_keygen_never_overwrites(capsys, tmp_path):
    assert main(["keygen", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "edgetl-signing.key").read_bytes()
    capsys.readouterr()
    _error(capsys, ["keygen", "--out", str(tmp_path)], "already exists")
    assert (tmp_path / "edgetl-signing.key").read_bytes() == before
    (tmp_path / "file").write_text("x")
    _error(capsys, ["keygen", "--out", str(tmp_path / "file")], "not a directory")
    for name in ("../outside", "sub/key", ""):  # the keys go into --out, nowhere else
        _error(capsys, ["keygen", "--out", str(tmp_path / "keys"), "--name", name], "plain file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgetl-signing.key", "edgetl-signing.pub", "file"]


@pytest.mark.parametrize("micro", ["3", "0"])
def test_export_micro_batch_not_dividing_the_batch(capsys, tmp_path, micro):
    _error(capsys, ["export", "mnist_cnn", *PLAN[1:], "--target", "onnx", "--batch-size", "8",
                    "--micro-batch", micro, "--out", str(tmp_path / "b")], "--micro-batch", "divisor of --batch-size 8")
    assert not (tmp_path / "b").exists()


def test_export_micro_batch_for_a_target_keeping_its_own_optimizer_state(capsys, tmp_path):
    _error(capsys, ["export", "mnist_cnn", *PLAN[1:], "--target", "ort-training", "--batch-size", "8",
                    "--micro-batch", "2", "--out", str(tmp_path / "b")], "onnx and executorch targets",
           "ort-training target's step takes whole batches")
    assert not (tmp_path / "b").exists()
