"""Federated training of the tiny parts with Flower (edgetl fleet): the Simulation Runtime with
the device runtime's ClientApp, bad and dying clients, the per-round checkpoint and resume, and
the split of the data over clients. Each simulation starts Ray (tens of seconds on 2 cores)."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

import edgetl
from edgetl.errors import EdgeTLError
from edgetl.exporters import export
from edgetl.fleet import partition, simulate
from edgetl.fleet.server import fleet_progress
from edgetl.runtime import checkpoint as ckpt

pytest.importorskip("flwr")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

B = 16


def _bundle(path, seed: int):
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10, seed=seed)
    return export(pm, "onnx", path, edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9), batch_size=B)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from edgetl.datasets import load_dataset

    root = tmp_path_factory.mktemp("fleet")
    ds = load_dataset("digits", input_size=28, channels=1)
    data = root / "digits.npz"
    with open(data, "wb") as f:
        np.savez(f, x_train=ds.x_train[:480], y_train=ds.y_train[:480], x_test=ds.x_test[:200],
                 y_test=ds.y_test[:200])
    return {"root": root, "bundle": _bundle(root / "bundle", 0), "data": data}


@pytest.fixture(scope="module")
def run(fleet):
    """3 clients, 2 rounds, through the CLI, checkpointing the global tiny parts each round."""
    r = subprocess.run([sys.executable, "-m", "edgetl", "fleet", "simulate", str(fleet["bundle"]), "--data",
                        str(fleet["data"]), "--clients", "3", "--rounds", "2", "--partition", "iid", "--seed", "0",
                        "--lr", "0.05", "--checkpoint", str(fleet["root"] / "global.npz"), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_simulation_learns_sending_only_the_tiny_parts(run):
    assert run["rounds"] == 2 and run["clients"] == 3 and len(run["accuracy_per_round"]) == 2
    assert run["test_accuracy"] == run["accuracy_per_round"][-1] > 0.8
    assert run["test_accuracy"] > run["initial_accuracy"] + 0.5
    assert run["bytes_up_per_client_round"] == 3050 * 4  # the 3,050 trainable parameters, float32
    assert run["full_model_bytes"] == 390_410 * 4
    # on the wire: one message each way per client and round, the payload plus Flower's framing
    assert run["wire_messages_per_client_round"] == 1
    assert run["bytes_up_per_client_round"] < run["wire_bytes_up_per_client_round"] < 3050 * 4 + 2000
    assert run["secagg"] is None and run["dp"] is None
    assert run["dropped"] == [] and run["skipped_rounds"] == []
    assert sum(run["client_samples"]) == 480 and run["wall_s"] > 0


@pytest.mark.slow
def test_the_round_checkpoint_is_a_device_checkpoint(fleet, run):
    path = fleet["root"] / "global.npz"
    arrays, header = ckpt.load_checkpoint(path)
    assert fleet_progress(header, path) == (2, run["accuracy_per_round"])
    assert len(arrays) == 12 and all(np.isfinite(v).all() for v in arrays.values())  # 6 tensors, 6 moments
    # the global tiny parts are a device checkpoint of the bundle: the device CLI evaluates them as they are
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "evaluate", str(fleet["bundle"]), "--data",
                        str(fleet["data"]), "--checkpoint", str(path), "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == run["test_accuracy"]
    # resuming from it: test_bad_and_dying_clients... (one Ray start fewer)


def _replace_arrays(reply, fn):
    from flwr.app import Array, ArrayRecord

    from edgetl.runtime.fleet import ARRAYS

    arrays = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    reply.content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in fn(arrays).items()})
    return reply


def _faulty_app(other_bundle: str):
    """The device ClientApp, except for these nodes: in round 3, node 0 sends NaN, node 1 a wrong
    shape, node 2 another bundle's tensors (same shapes), node 3 dies; in round 4 nodes 0-4 die."""
    from flwr.clientapp import ClientApp

    def train(msg, context):
        from edgetl.runtime.fleet import _train

        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        if (rnd == 3 and pid == 3) or (rnd == 4 and pid <= 4):
            raise RuntimeError(f"device {pid} died mid-round")
        if rnd == 3 and pid == 2:
            msg.content["config"]["bundle"] = other_bundle
        reply = _train(msg, context)
        if rnd == 3 and pid == 0:
            return _replace_arrays(reply, lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()})
        if rnd == 3 and pid == 1:
            return _replace_arrays(reply, lambda a: {k: (v[:3] if i == 0 else v) for i, (k, v) in enumerate(a.items())})
        return reply

    app = ClientApp()
    app.train()(train)
    return app


@pytest.mark.slow
def test_resume_with_bad_and_dying_clients_dropped_and_too_few_keeping_the_global_parts(fleet, run, tmp_path,
                                                                                     caplog):
    """Rounds 3-4 resumed from the 3-client run's round-2 checkpoint, now with 7 clients, 4 of them
    bad in round 3 and 5 dead in round 4 (a round needs 3 of 7)."""
    import shutil

    import cloudpickle

    path = tmp_path / "global.npz"
    shutil.copy(fleet["root"] / "global.npz", path)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray workers cannot import this file
    app = _faulty_app(str(_bundle(fleet["root"] / "other", 1)))  # same shapes, another head
    with caplog.at_level(logging.WARNING, logger="edgetl.fleet"):
        out = simulate(str(fleet["bundle"]), str(fleet["data"]), clients=7, rounds=4, lr=0.05, seed=1,
                       min_reply_fraction=0.4, client_app=app, checkpoint=str(path))
    assert out["resumed_from"] == 2 and len(out["accuracy_per_round"]) == 4
    assert out["accuracy_per_round"][:2] == run["accuracy_per_round"]
    assert fleet_progress(ckpt.load_checkpoint(path)[1], path)[0] == 4
    assert {d["round"] for d in out["dropped"]} == {3, 4}
    reasons = " | ".join(d["reason"] for d in out["dropped"] if d["round"] == 3)
    assert len([d for d in out["dropped"] if d["round"] == 3]) == 4, reasons
    assert "is not finite" in reasons and "has shape (3,)" in reasons and "another bundle" in reasons
    assert "device 3 died mid-round" in reasons
    assert len([d for d in out["dropped"] if d["round"] == 4]) == 5
    # round 3 averaged the three good updates; round 4 had two, so the global parts were kept
    assert out["skipped_rounds"] == [4]
    assert out["accuracy_per_round"][3] == out["accuracy_per_round"][2] > 0.8
    logged = caplog.text
    assert "dropped the update of node" in logged and "is not finite" in logged and "are kept" in logged


def test_partition_iid_and_dirichlet_cover_every_sample_once():
    y = np.repeat(np.arange(10), 50)
    for scheme in ("iid", "dirichlet:0.5"):
        parts = partition(y, 10, scheme, seed=0, min_size=B)
        assert sorted(np.concatenate(parts).tolist()) == list(range(500))
        assert min(len(p) for p in parts) >= B
    iid = partition(y, 10, "iid", seed=0)
    skew = partition(y, 10, "dirichlet:0.1", seed=0, min_size=B)
    top = lambda parts: np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])  # noqa: E731
    assert top(skew) > 2 * top(iid)  # label skew: a client's commonest class dominates its shard
    assert [p.tolist() for p in partition(y, 10, "dirichlet:0.5", seed=3, min_size=B)] == \
        [p.tolist() for p in partition(y, 10, "dirichlet:0.5", seed=3, min_size=B)]


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:0", "dirichlet:x", "noniid"])
def test_partition_refuses_bad_schemes(scheme):
    with pytest.raises(EdgeTLError, match="--partition must be iid or dirichlet:ALPHA"):
        partition(np.zeros(10, int), 2, scheme, seed=0)


def test_partition_refuses_clients_without_a_batch():
    with pytest.raises(EdgeTLError, match="cannot give 10 clients 16 each"):
        partition(np.zeros(100, int), 10, "iid", seed=0, min_size=B)


def test_cli_bad_partition_is_one_line_before_ray_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgetl", "fleet", "simulate", str(tmp_path), "--data", "x.npz",
                        "--clients", "3", "--rounds", "1", "--partition", "dirichlet:-1", "--seed", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--partition must be iid or dirichlet:ALPHA" in r.stderr


def test_device_client_app_loads_without_torch():
    code = ("from edgetl.runtime.notorch import block_torch; block_torch()\n"
            "import edgetl.runtime.fleet as f\n"
            "from flwr.clientapp import ClientApp\n"
            "from flwr.client.mod import fixedclipping_mod, secaggplus_mod  # what --secagg, --dp-* run there\n"
            "assert isinstance(f.app, ClientApp)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path, text: str, procs, seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        dead = [p.args[0] for p in procs if p.poll() is not None]
        assert not dead, f"{dead} exited: {path.read_text(errors='replace')[-2000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no '{text}' in {path} after {seconds} s: {path.read_text(errors='replace')[-2000:]}")


@pytest.mark.slow
def test_deployment_superlink_and_three_supernodes(fleet, tmp_path):
    """Flower's Deployment Runtime on localhost, insecure: a SuperLink and three SuperNodes as
    separate processes, each node with its own bundle path and data file; `flwr run` submits the
    app; everything is shut down (process groups) whatever happens."""
    import os
    import signal
    from pathlib import Path

    from edgetl.fleet.deploy import write_app

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr-home")}
    port = _free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    d = np.load(fleet["data"])
    for i in range(3):  # each device holds its own data file
        with open(tmp_path / f"device{i}.npz", "wb") as f:
            np.savez(f, x_train=d["x_train"][i::3], y_train=d["y_train"][i::3], x_test=d["x_test"][:0],
                     y_test=d["y_test"][:0])
    out = tmp_path / "summary.json"
    app = write_app(tmp_path / "app", str(fleet["bundle"]), str(fleet["data"]), rounds=2, clients=3, out=str(out),
                    lr=0.05, checkpoint=str(tmp_path / "global.npz"), round_timeout=120)

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen([str(bin_dir / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path, start_new_session=True)

    procs = []
    try:
        procs.append(start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(port)))
        _wait_for(tmp_path / "superlink.log", "Uvicorn running", procs, 120)
        for i in range(3):
            procs.append(start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                               "--port", str(_free_port()), "--node-config",
                               f"bundle='{fleet['bundle']}' data='{tmp_path / f'device{i}.npz'}'"))
        r = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "local", "--stream"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        summary = json.loads(out.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert summary["rounds"] == 2 and len(summary["accuracy_per_round"]) == 2
    assert summary["test_accuracy"] > 0.8 and summary["dropped"] == [] and summary["skipped_rounds"] == []
    assert fleet_progress(ckpt.load_checkpoint(tmp_path / "global.npz")[1], "global")[0] == 2


def test_a_checkpoint_of_another_bundle_is_refused_before_ray_starts(fleet, tmp_path):
    from edgetl.runtime import Trainer

    other = Trainer.load(_bundle(tmp_path / "other", 1))
    other.save_checkpoint(tmp_path / "ckpt.npz")  # a device checkpoint of another bundle
    with pytest.raises(EdgeTLError, match="belongs to another bundle"):
        simulate(str(fleet["bundle"]), str(fleet["data"]), clients=3, rounds=1, seed=0,
                 checkpoint=str(tmp_path / "ckpt.npz"))
    Trainer.load(fleet["bundle"]).save_checkpoint(tmp_path / "mine.npz")  # this bundle's, but not a fleet's
    with pytest.raises(EdgeTLError, match="not a fleet checkpoint"):
        simulate(str(fleet["bundle"]), str(fleet["data"]), clients=3, rounds=1, seed=0,
                 checkpoint=str(tmp_path / "mine.npz"))
