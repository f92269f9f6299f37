"""The device side of federated training with Flower: a ClientApp that trains the bundle's tiny
parts on local data with the torch-free Trainer and sends back only the trainable tensors.

A SuperNode runs it as `edgetl.runtime.fleet:app` with its local files in the node config:

    flower-supernode --insecure --superlink HOST:9092 \\
        --node-config "bundle='/path/to/bundle' data='/path/to/local.npz'"

In the Simulation Runtime the node config has no files; the server's message names the bundle
and a folder of shards, and the node reads `client-<partition-id>.npz` from it.

Optimizer moments are not federated: each round starts from the global trainable tensors with
the bundle's initial (zero) moments and a fresh step count, so a round is `local-epochs` of plain
local training from the global model. Flower is imported only when the app is built (the `fleet`
extra); this module never imports torch.

Privacy (`fleet simulate --secagg`, `--dp-noise/--dp-clip`): a round that asks for Flower's
SecAgg+ protocol (its messages carry a `secaggplus_configs` record) goes through Flower's
`secaggplus_mod`, and one that asks for client-side clipping through its `fixedclipping_mod`;
those rounds speak Flower's legacy fit format, which `_train_legacy` answers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle import MANIFEST_DIGEST, Bundle
from .data import load_npz
from .errors import InputError
from .trainer import Trainer

__all__ = ["app", "bundle_id", "client_app", "start_round", "train_round", "trainable_state"]  # Flower finds `app` here

ARRAYS, METRICS, META = "arrays", "metrics", "meta"  # keys of the records in a reply
WEIGHT = "num-examples"  # FedAvg's weight: the examples a client trained on
# Flower's own record names: its SecAgg+ protocol's, its legacy fit message's, its DP clipping norm's
SECAGG_CONFIGS, LEGACY_PARAMS, LEGACY_CONFIG, CLIPPING_NORM = ("secaggplus_configs", "fitins.parameters",
                                                               "fitins.config", "clipping_norm")

_trainers: dict[str, Trainer] = {}  # one loaded bundle per process (a Ray actor serves many rounds)


def bundle_id(bundle: Bundle) -> str:
    """What tells one bundle's tensors from another's of the same shapes."""
    return str(bundle.manifest[MANIFEST_DIGEST])


def trainable_state(trainer: Trainer) -> dict[str, np.ndarray]:
    state = trainer.get_state()
    return {t: np.array(state[t], dtype=np.float32) for t in trainer.bundle.trainable}


def start_round(trainer: Trainer, arrays: dict[str, np.ndarray]) -> None:
    """Global trainable tensors in, moments and step count reset (see the module docstring)."""
    state = trainer.bundle.initial_state()
    shapes = trainer.bundle.tensor_shapes()
    for t in trainer.bundle.trainable:
        if t not in arrays or tuple(arrays[t].shape) != tuple(shapes[t]):
            raise InputError(f"the server sent no tensor '{t}' of shape {tuple(shapes[t])} for this bundle")
        state[t] = np.asarray(arrays[t], dtype=np.float32)
    trainer.set_state(state)
    trainer.step = trainer.epoch = 0


def train_round(trainer: Trainer, arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                epochs: int, lr: float | None, seed: int) -> tuple[dict[str, np.ndarray], float | None]:
    """One client's round: (its new trainable tensors, its last loss)."""
    start_round(trainer, arrays)
    result = trainer.fit(x, y, epochs=epochs, lr=lr, seed=seed)
    return trainable_state(trainer), result.final_loss


def _trainer(path: str) -> Trainer:
    key = os.path.realpath(path)
    if key not in _trainers:
        _trainers[key] = Trainer.load(path)
    return _trainers[key]


def _local_files(config, node_config) -> tuple[str, str]:
    """(bundle, data file) of this node: its own node config, else the simulation's shards."""
    bundle = node_config.get("bundle") or config.get("bundle")
    if not bundle:
        raise InputError("this node has no bundle: start it with --node-config \"bundle='...' data='...'\"")
    data = node_config.get("data")
    if not data:
        if "shards" not in config or "partition-id" not in node_config:
            raise InputError("this node has no data: start it with --node-config \"bundle='...' data='...'\"")
        data = str(Path(str(config["shards"])) / f"client-{int(node_config['partition-id'])}.npz")
    return str(bundle), str(data)


def _round(config, arrays_of, context) -> tuple[Trainer, dict[str, np.ndarray], dict]:
    """The work of one round: (trainer, new trainable tensors, metrics). `arrays_of(trainer)`
    gives the global tensors the server sent, by name."""
    bundle, data_file = _local_files(config, context.node_config)
    trainer = _trainer(bundle)
    data = load_npz(data_file)
    x, y = data["x_train"], data["y_train"]
    lr = float(config["lr"]) if float(config.get("lr", 0.0)) > 0 else None
    seed = int(config.get("seed", 0)) + int(config.get("server-round", 0))
    new, loss = train_round(trainer, arrays_of(trainer), x, y, int(config.get("local-epochs", 1)), lr, seed)
    metrics = {WEIGHT: int(len(x))}
    if loss is not None:
        metrics["train-loss"] = float(loss)
    return trainer, new, metrics


def _train(msg, context):
    if LEGACY_PARAMS in msg.content.array_records:
        return _train_legacy(msg, context)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    arrays = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    trainer, new, metrics = _round(msg.content["config"], lambda t: arrays, context)
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in new.items()}),
                          METRICS: MetricRecord(metrics),
                          META: ConfigRecord({"bundle": bundle_id(trainer.bundle)})})
    return Message(content=content, reply_to=msg)


def _train_legacy(msg, context):
    """A round in Flower's legacy fit format, which its SecAgg+ protocol speaks: the tensors are
    an unnamed list in the bundle's trainable order; the bundle's id travels in the metrics."""
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    sent = parameters_to_ndarrays(fitins.parameters)

    def arrays_of(trainer: Trainer) -> dict[str, np.ndarray]:
        names = list(trainer.bundle.trainable)
        if len(sent) != len(names):
            raise InputError(f"the server sent {len(sent)} tensors; this bundle trains {len(names)}")
        return dict(zip(names, sent))

    trainer, new, metrics = _round(fitins.config, arrays_of, context)
    res = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([new[t] for t in trainer.bundle.trainable]),
                 metrics.pop(WEIGHT), {**metrics, "bundle": bundle_id(trainer.bundle)})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _secagg_when_asked(msg, context, call_next):
    """Flower's SecAgg+ client protocol for the messages of a SecAgg+ round; others pass."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _clip_when_asked(msg, context, call_next):
    """Flower's client-side fixed clipping (central DP) when the server asks for it in a legacy
    fit message (what a SecAgg+ round carries: the server cannot clip what it cannot see)."""
    if LEGACY_CONFIG in msg.content.config_records and CLIPPING_NORM in msg.content[LEGACY_CONFIG]:
        from flwr.client.mod import fixedclipping_mod

        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def client_app(train=None):
    """A Flower ClientApp that trains with `edgetl.runtime.Trainer` (needs the `fleet` extra),
    with Flower's SecAgg+ and client-side DP clipping for the rounds that ask for them.
    `train(msg, context)` replaces the training function under those mods (tests)."""
    try:
        from flwr.clientapp import ClientApp
    except ImportError as e:
        raise ImportError("federated training needs Flower: pip install 'edgetl[fleet]'") from e
    app = ClientApp(mods=[_secagg_when_asked, _clip_when_asked])
    app.train()(train or _train)
    return app


def __getattr__(name: str):
    if name == "app":  # `edgetl.runtime.fleet:app`, what a SuperNode loads; built on first use
        globals()["app"] = client_app()
        return globals()["app"]
    raise AttributeError(name)
