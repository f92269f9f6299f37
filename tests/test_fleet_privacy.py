"""The fleet's privacy options (Flower's SecAgg+ and fixed-clipping central DP): the secure sum
equals plain FedAvg up to SecAgg+'s quantization, clipping without noise is plain FedAvg of the
clipped updates, and the noise has the standard deviation DP promises."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import edgetl
from edgetl.errors import EdgeTLError
from edgetl.exporters import export
from edgetl.fleet import simulate
from edgetl.fleet.privacy import Privacy, secagg_error_bound
from edgetl.fleet.server import FleetConfig, FleetReport, make_strategy
from edgetl.runtime import checkpoint as ckpt
from edgetl.runtime.fleet import ARRAYS, META, METRICS, WEIGHT

pytest.importorskip("flwr")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPES = {"w": (100, 50), "b": (50,)}
DIGEST = "d" * 64


def _reply(node: int, arrays: dict | None, n: int = 0):
    """A client's reply as Flower's runtime hands it to the strategy (None: the client failed)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Metadata, MetricRecord, RecordDict
    from flwr.app.message import make_message

    md = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                  reply_to_message_id=f"ins-{node}", group_id="1", created_at=time.time(), ttl=60.0,
                  message_type="train")
    if arrays is None:
        return make_message(md, error=Error(code=0, reason=f"device {node} died mid-round"))
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                          METRICS: MetricRecord({WEIGHT: n}), META: ConfigRecord({"bundle": DIGEST})})
    return make_message(md, content)


def _clients():
    rng = np.random.default_rng(0)
    g = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
    scales = [0.005, 0.02, 0.04]  # update norms ~0.36, 1.4, 2.8 around the clipping norm 1
    new = [{k: g[k] + rng.normal(0, s, v.shape).astype(np.float32) for k, v in g.items()} for s in scales]
    return g, new, [50, 100, 30]


def _dp_round(noise: float, clip: float, with_bad: bool = False):
    """One round's aggregate through make_strategy with server-side DP (Flower's wrapper)."""
    from flwr.app import Array, ArrayRecord

    g, new, ns = _clients()
    cfg = FleetConfig(bundle="unused", x_test=np.zeros(0), y_test=np.zeros(0), rounds=1, clients=3,
                      privacy=Privacy(dp_noise=noise, dp_clip=clip).check())
    report = FleetReport()
    strategy = make_strategy(SHAPES, DIGEST, cfg, report)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in g.items()})  # what configure_train records
    strategy.strategy.sent = 3 + 2 * with_bad
    replies = [_reply(i + 1, a, n) for i, (a, n) in enumerate(zip(new, ns))]
    if with_bad:  # Flower's DP wrapper alone would skip a round with a failed client, and clip NaN
        replies.insert(1, _reply(9, {k: np.full_like(v, np.nan) for k, v in g.items()}, 500))
        replies.append(_reply(8, None))
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}, g, new, ns, report


def _clipped_fedavg(g, new, ns, clip):
    out = {k: np.zeros(v.shape, np.float64) for k, v in g.items()}
    factors = []
    for a, n in zip(new, ns):
        norm = np.sqrt(sum(float(((a[k] - g[k]).astype(np.float64) ** 2).sum()) for k in g))
        factors.append(min(1.0, clip / norm))
        for k in g:
            out[k] += n * (g[k] + factors[-1] * (a[k] - g[k]))
    return {k: v / sum(ns) for k, v in out.items()}, factors


def test_dp_without_noise_is_fedavg_of_the_clipped_updates_and_bad_replies_never_reach_it():
    got, g, new, ns, report = _dp_round(0.0, 1.0, with_bad=True)
    want, factors = _clipped_fedavg(g, new, ns, 1.0)
    assert factors[0] == 1.0 and factors[2] < 0.5  # one update inside the norm, one clipped hard
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert [d["node"] for d in report.dropped] == [9, 8] and report.skipped_rounds == []
    assert "is not finite" in report.dropped[0]["reason"] and "device 8 died" in report.dropped[1]["reason"]


def test_dp_noise_has_the_promised_standard_deviation():
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    noisy, g, new, ns, _ = _dp_round(0.8, 1.0)
    clean, *_ = _dp_round(0.0, 1.0)
    diff = np.concatenate([(noisy[k] - clean[k]).ravel() for k in SHAPES]).astype(np.float64)
    std = 0.8 * 1.0 / 3  # noise multiplier x clipping norm / sampled clients
    assert abs(diff.std() / std - 1) < 0.05, diff.std()  # 5,050 draws: the estimate is within ~1 %
    assert abs(diff.mean()) < 4 * std / np.sqrt(diff.size)


@pytest.mark.parametrize("kw,match", [({"dp_noise": 1.0}, "needs both --dp-noise and --dp-clip"),
                                      ({"dp_noise": -1.0, "dp_clip": 1.0}, "--dp-noise must be ≥ 0"),
                                      ({"dp_noise": 1.0, "dp_clip": 0.0}, "--dp-clip must be a positive"),
                                      ({"secagg": True, "shares": 2}, "--secagg-shares must be"),
                                      ({"secagg": True, "shares": 5, "threshold": 5}, "--secagg-threshold must be"),
                                      ({"secagg": True, "clip": -1.0}, "--secagg-clip must be")])
def test_bad_privacy_settings_are_refused(kw, match):
    with pytest.raises(EdgeTLError, match=match):
        Privacy(**kw).check()


def test_cli_bad_privacy_flag_is_one_line_before_ray_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgetl", "fleet", "simulate", str(tmp_path), "--data", "x.npz",
                        "--clients", "3", "--rounds", "1", "--seed", "0", "--dp-noise", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "needs both --dp-noise and --dp-clip" in r.stderr


def _recording_app(folder, dies: int):
    """The device ClientApp (Flower's SecAgg+ and clipping mods around edgetl's training), whose
    training also writes what it received and what it would send in the clear to `folder`: the
    plain updates that SecAgg+ hides from the server, to check its sum against. Client `dies`
    dies in its training (after the key exchange)."""
    from edgetl.runtime.fleet import _train, client_app

    def train(msg, context):
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        pid = int(context.node_config["partition-id"])
        if pid == dies:
            raise RuntimeError(f"device {pid} died mid-round")
        sent = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        reply = _train(msg, context)
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        new = parameters_to_ndarrays(res.parameters)
        np.savez(folder / f"client-{pid}.npz", n=res.num_examples, **{f"sent{i}": a for i, a in enumerate(sent)},
                 **{f"new{i}": a for i, a in enumerate(new)})
        return reply

    return client_app(train)


@pytest.mark.slow
def test_secagg_sum_of_client_clipped_updates_equals_plain_fedavg_within_quantization(tmp_path):
    """4 clients of different sizes, one SecAgg+ round with client-side clipping and no noise,
    one client dying after the key exchange: the global tiny parts equal the example-weighted
    mean of the other clients' clipped updates (SecAgg+ rebuilds the dead client's masks from
    its shares), to within the bound that SecAgg+'s quantization allows."""
    import cloudpickle

    from edgetl.datasets import load_dataset

    ds = load_dataset("digits", input_size=28, channels=1)
    data = tmp_path / "digits.npz"
    with open(data, "wb") as f:
        np.savez(f, x_train=ds.x_train[:400], y_train=ds.y_train[:400], x_test=ds.x_test[:100], y_test=ds.y_test[:100])
    pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10, seed=0)
    bundle = export(pm, "onnx", tmp_path / "bundle", edgetl.OptimizerConfig.make("sgd", lr=0.05, momentum=0.9),
                    batch_size=16)
    (tmp_path / "sent").mkdir()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray workers cannot import this file
    clip = 1.5
    pythonpath = os.environ.get("PYTHONPATH")
    out = simulate(str(bundle), str(data), clients=4, rounds=1, partition_scheme="dirichlet:1.0", seed=0, lr=0.05,
                   checkpoint=str(tmp_path / "global.npz"), client_app=_recording_app(tmp_path / "sent", dies=3),
                   privacy=Privacy(secagg=True, dp_noise=0.0, dp_clip=clip))
    assert os.environ.get("PYTHONPATH") == pythonpath  # Ray's change to it undone: other Pythons still start
    assert out["skipped_rounds"] == [] and len(out["dropped"]) == 1
    assert out["dropped"][0]["reason"] == "the client failed: device 3 died mid-round"
    assert out["dp"]["clipping"] == "client" and out["secagg"]["max_weight"] == max(out["client_samples"])
    # SecAgg+'s four messages a round (the dead client gets no unmask message); the masked tensors
    # are 64-bit integers, twice the float32 payload (the dead client sends only keys and shares)
    assert out["wire_messages_per_client_round"] == 15 / 4
    assert out["wire_bytes_up_per_client_round"] > 1.5 * out["bytes_up_per_client_round"]

    clients = [np.load(tmp_path / "sent" / f"client-{i}.npz") for i in range(3)]
    names = [k for k in edgetl.runtime.Trainer.load(bundle).bundle.trainable]
    g = {k: clients[0][f"sent{i}"] for i, k in enumerate(names)}
    new = [{k: c[f"new{i}"] for i, k in enumerate(names)} for c in clients]
    ns = [int(c["n"]) for c in clients]
    assert ns == out["client_samples"][:3] and len(set(ns)) == 3
    want, factors = _clipped_fedavg(g, new, ns, clip)
    assert min(factors) < 1  # the clipping took part
    arrays, _ = ckpt.load_checkpoint(tmp_path / "global.npz")
    p = Privacy(secagg=True, max_weight=float(max(out["client_samples"])))
    max_abs = max(float(np.abs(a[k]).max()) for a in [g, *new] for k in names)
    bound = secagg_error_bound(p, ns, max_abs) + 1e-7 * max_abs  # + float32 rounding
    err = max(float(np.abs(arrays[k] - want[k]).max()) for k in names)
    assert err <= bound, (err, bound)
    assert bound < 1e-4  # the bound is tight enough that a wrong weighting or a missed clip fails it
    json.dumps(out)
