"""The host side of federated training: a FedAvg over the bundle's trainable tensors that drops
bad updates (with a logged reason), keeps the global tiny parts when too few clients report,
evaluates them on the test split after every round and checkpoints them (resumable)."""
from __future__ import annotations

import json

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeTLError
from ..runtime import checkpoint as ckpt
from ..runtime.errors import CheckpointError
from ..runtime.fleet import ARRAYS, META, METRICS, WEIGHT, bundle_id, start_round, trainable_state
from ..runtime.progress import Progress
from ..runtime.trainer import Trainer
from .privacy import Privacy
from .wire import CountingGrid, WireCount

log = logging.getLogger("edgetl.fleet")


@dataclass
class FleetConfig:
    bundle: str
    x_test: np.ndarray
    y_test: np.ndarray
    rounds: int
    clients: int  # nodes to wait for before the first round
    fraction: float = 1.0
    local_epochs: int = 1
    lr: float | None = None
    seed: int = 0
    min_reply_fraction: float = 0.5  # of the sampled clients, for a round to count
    checkpoint: str | None = None
    shards: str | None = None  # simulation: the folder of client-<i>.npz
    round_timeout: float = 600.0
    progress: bool = False
    privacy: "Privacy" = field(default_factory=lambda: Privacy())


@dataclass
class FleetReport:
    initial_accuracy: float | None = None
    accuracy_per_round: list[float] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # {"round", "node", "reason"}
    skipped_rounds: list[int] = field(default_factory=list)  # too few usable updates: global kept
    resumed_from: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    wire: WireCount = field(default_factory=WireCount)


def client_failure(reason: str) -> str:
    """The drop reason of a client that failed, from the error Flower reports for it."""
    # a simulated client's exception arrives wrapped in Ray's traceback; its own message is last
    if "ClientAppException" in reason:
        reason = reason.rsplit("Message: ", 1)[-1].strip().rstrip("'>")
    return f"the client failed: {' '.join(reason.split())[:200]}"


def reply_problem(msg, shapes: dict[str, tuple], digest: str) -> str | None:
    """Why a client's reply cannot be averaged in, or None when it can."""
    if msg.has_error():
        return client_failure(str(msg.error.reason))
    content = msg.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"the reply has no '{ARRAYS}' or '{METRICS}' record"
    meta = content.config_records.get(META)
    if meta is None or "bundle" not in meta:
        return "the reply does not say which bundle its tensors are of"
    if meta["bundle"] != digest:
        return f"its tensors are of another bundle (manifest {str(meta['bundle'])[:12]}…, not {digest[:12]}…)"
    names = set(content[ARRAYS].keys())
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        return f"its tensors do not match the bundle's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, arr in content[ARRAYS].items():
        try:
            v = arr.numpy()
        except Exception as e:  # a payload numpy cannot read back
            return f"tensor '{name}' cannot be read ({type(e).__name__})"
        if tuple(v.shape) != tuple(shapes[name]):
            return f"tensor '{name}' has shape {tuple(v.shape)}, not {tuple(shapes[name])}"
        if not np.issubdtype(v.dtype, np.floating):
            return f"tensor '{name}' is {v.dtype}, not floating point"
        if not np.isfinite(v).all():
            return f"tensor '{name}' is not finite"
    n = content[METRICS].get(WEIGHT)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"'{WEIGHT}' must be a positive integer, got {n!r}"
    return None


def make_strategy(shapes: dict[str, tuple], digest: str, cfg: FleetConfig, report: FleetReport, offset: int = 0):
    """FedAvg over the tiny parts that drops bad replies; with --dp-noise, wrapped in Flower's
    central DP with server-side fixed clipping, which sees only the usable replies."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

    class TinyPartsFedAvg(FedAvg):
        """FedAvg weighted by examples over the trainable tensors, refusing bad replies."""

        sent = 0

        def configure_train(self, server_round, arrays, config, grid):
            msgs = list(super().configure_train(server_round + offset, arrays, config, grid))
            self.sent = len(msgs)
            return msgs

        def usable(self, server_round, replies) -> list | None:
            """The replies that can be averaged in (tensors in the bundle's order), or None when
            too few are (the global tiny parts are then kept)."""
            r = server_round + offset
            good = []
            for msg in replies:
                why = reply_problem(msg, shapes, digest)
                if why is None:
                    arrays = msg.content[ARRAYS]
                    msg.content[ARRAYS] = ArrayRecord({k: Array(arrays[k].numpy()) for k in shapes})
                    good.append(msg)
                    continue
                node = msg.metadata.src_node_id
                report.dropped.append({"round": r, "node": int(node), "reason": why})
                log.warning("round %d: dropped the update of node %s: %s", r, node, why)
            need = max(1, math.ceil(cfg.min_reply_fraction * self.sent))
            if len(good) < need:
                report.skipped_rounds.append(r)
                log.warning("round %d: %d of %d clients sent a usable update, %d needed; the global tiny parts "
                            "are kept", r, len(good), self.sent, need)
                return None
            return good

        def aggregate_train(self, server_round, replies):
            good = self.usable(server_round, replies)
            if good is None:
                return None, None
            contents = [m.content for m in good]
            return (aggregate_arrayrecords(contents, WEIGHT),
                    aggregate_metricrecords([_metrics_only(c) for c in contents], WEIGHT))

    fedavg = TinyPartsFedAvg(fraction_train=cfg.fraction, fraction_evaluate=0.0, min_train_nodes=1,
                             min_available_nodes=cfg.clients)
    dp = cfg.privacy
    if dp.dp_noise is None:
        return fedavg

    class UsableRepliesDP(DifferentialPrivacyServerSideFixedClipping):
        def aggregate_train(self, server_round, replies):
            good = fedavg.usable(server_round, replies)
            return (None, None) if good is None else super().aggregate_train(server_round, good)

    return UsableRepliesDP(fedavg, dp.dp_noise, dp.dp_clip, sampled_clients(cfg))


def sampled_clients(cfg: FleetConfig) -> int:
    """How many clients a round samples (Flower's FedAvg: the fraction of the nodes, at least one)."""
    return max(int(cfg.clients * cfg.fraction), 1)


def _metrics_only(content):
    from flwr.app import RecordDict

    return RecordDict({METRICS: content[METRICS]})


def _save_checkpoint(path: str, trainer: Trainer, r: int, accuracy: list[float], cfg: FleetConfig) -> None:
    """The global tiny parts (with the round's fresh moments) as a device-runtime checkpoint of the
    bundle, so `edgetl.runtime evaluate|export-inference --checkpoint` read it as it is."""
    b = trainer.bundle
    meta = {"step": r, "epoch": r, "seed": int(cfg.seed), "target": b.target, "bundle": b.manifest["files"],
            "bundle_manifest": bundle_id(b), "fleet_round": r, "accuracy_per_round": list(accuracy),
            "schedule": {"name": "constant", "lr": float(cfg.lr or b.manifest["optimizer"]["lr"]), "total_steps": 0}}
    ckpt.save_checkpoint(path, trainer.get_state(), meta)


def _load_checkpoint(path: str, digest: str, shapes: dict) -> tuple[dict, int, list[float]]:
    arrays, header, used = ckpt.load_latest(path)
    if header.get("bundle_manifest") != digest:
        raise EdgeTLError(f"fleet checkpoint '{used}' belongs to another bundle")
    if "fleet_round" not in header:
        raise EdgeTLError(f"checkpoint '{used}' is not a fleet checkpoint (it has no round)")
    if any(k not in arrays or tuple(arrays[k].shape) != tuple(s) for k, s in shapes.items()):
        raise EdgeTLError(f"fleet checkpoint '{used}' does not match the bundle's trainable tensors")
    arrays = {k: arrays[k] for k in shapes}
    return arrays, *fleet_progress(header, used)


def fleet_progress(header: dict, path) -> tuple[int, list[float]]:
    """(rounds done, accuracy per round) from a fleet checkpoint's header, whose extra fields a
    version 4 checkpoint holds as strings (the round in decimal, the accuracies as JSON)."""
    try:
        acc = header["accuracy_per_round"]
        acc = json.loads(acc) if isinstance(acc, str) else acc
        return int(header["fleet_round"]), [float(a) for a in acc]
    except (KeyError, TypeError, ValueError):
        raise EdgeTLError(f"fleet checkpoint '{path}' has an invalid round or accuracy list") from None


def check_checkpoint(path: str | None, bundle) -> int:
    """The round a fleet checkpoint of `bundle` holds (0: none yet); refused when it is of
    another bundle or no fleet checkpoint."""
    if not path or not Path(path).exists():
        return 0
    shapes = {t: bundle.tensor_shapes()[t] for t in bundle.trainable}
    try:
        return _load_checkpoint(path, bundle_id(bundle), shapes)[1]
    except CheckpointError as e:
        raise EdgeTLError(str(e)) from None


def run_server(grid, cfg: FleetConfig, report: FleetReport, context=None) -> FleetReport:
    """The ServerApp's work: federate for cfg.rounds rounds (resuming from cfg.checkpoint).
    `context`: the ServerApp's (SecAgg+ runs in Flower's legacy workflow, which needs it)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    trainer = Trainer.load(cfg.bundle)
    digest, shapes = bundle_id(trainer.bundle), {t: trainer.bundle.tensor_shapes()[t] for t in trainer.bundle.trainable}
    arrays, done = trainable_state(trainer), 0
    if cfg.checkpoint and Path(cfg.checkpoint).exists():
        try:
            arrays, done, report.accuracy_per_round = _load_checkpoint(cfg.checkpoint, digest, shapes)
        except CheckpointError as e:
            raise EdgeTLError(str(e)) from None
        report.resumed_from = done
        log.info("resuming at round %d from '%s'", done + 1, cfg.checkpoint)
    report.arrays = arrays
    bar = Progress(cfg.rounds, desc="fleet", enabled=cfg.progress)
    bar.update(done)

    def evaluate_arrays(server_round: int, new: dict[str, np.ndarray]) -> float | None:
        report.wire.round = server_round + 1
        if server_round == 0 and done:
            return None  # the checkpointed state, evaluated when it was saved
        start_round(trainer, new)
        acc = trainer.evaluate(cfg.x_test, cfg.y_test)["accuracy"]
        if server_round == 0:
            report.initial_accuracy = acc
            return acc
        r = done + server_round
        report.accuracy_per_round.append(acc)
        report.arrays = new
        if cfg.checkpoint:
            _save_checkpoint(cfg.checkpoint, trainer, r, report.accuracy_per_round, cfg)
        bar.update(1, round=r, acc=acc)
        return acc

    def evaluate(server_round: int, record) -> MetricRecord | None:
        acc = evaluate_arrays(server_round, {k: v.numpy().astype(np.float32) for k, v in record.items()})
        return None if acc is None else MetricRecord({"accuracy": acc})

    config = {"local-epochs": int(cfg.local_epochs), "lr": float(cfg.lr or 0.0), "seed": int(cfg.seed),
              "bundle": str(Path(cfg.bundle).resolve())}
    if cfg.shards:
        config["shards"] = str(Path(cfg.shards).resolve())
    grid = CountingGrid(grid, report.wire)
    try:
        if done < cfg.rounds and cfg.privacy.secagg:
            from .secagg import run_secagg

            run_secagg(grid, context, cfg, report, shapes, digest, arrays, done, config, evaluate_arrays)
        elif done < cfg.rounds:
            strategy = make_strategy(shapes, digest, cfg, report, offset=done)
            strategy.start(grid, ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                           num_rounds=cfg.rounds - done, timeout=cfg.round_timeout,
                           train_config=ConfigRecord(config), evaluate_fn=evaluate)
    finally:
        bar.close()
    return report


def server_app(cfg: FleetConfig, report: FleetReport):
    """A Flower ServerApp running `run_server` (in-process: the report is filled in place)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_server(grid, cfg, report, context)

    return app
