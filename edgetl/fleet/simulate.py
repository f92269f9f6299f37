"""`edgetl fleet simulate`: N simulated devices in Flower's Simulation Runtime, each training
its shard of a data file with the device runtime, averaged by the tiny-parts FedAvg."""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import replace

import numpy as np

from ..errors import EdgeTLError
from ..runtime.bundle import load_bundle
from ..runtime.data import check_images, check_labels, load_npz
from .partition import partition, write_shards
from .privacy import Privacy
from .secagg import secagg_sampled
from .server import FleetConfig, FleetReport, check_checkpoint, sampled_clients, server_app


def upload_bytes(bundle) -> int:
    """What one client sends per round: its trainable tensors as float32."""
    shapes = bundle.tensor_shapes()
    return int(sum(4 * int(np.prod(shapes[t])) for t in bundle.trainable))


def full_model_bytes(bundle) -> int:
    """What a client of full-model FedAvg would send: every parameter as float32."""
    return int(4 * bundle.manifest["summary"]["total_params"])


def simulate(bundle: str, data: str, clients: int, rounds: int, partition_scheme: str = "iid",
             fraction: float = 1.0, local_epochs: int = 1, lr: float | None = None, seed: int = 0,
             checkpoint: str | None = None, progress: bool = False, min_reply_fraction: float = 0.5,
             client_app=None, verbose: bool = False, privacy: Privacy | None = None) -> dict:
    """Run the federation; `client_app` replaces the device runtime's ClientApp (e.g. a faulty
    fleet in tests). Returns the summary that `--json` prints."""
    privacy = (privacy or Privacy()).check()
    if rounds < 1:
        raise EdgeTLError(f"--rounds must be ≥ 1, got {rounds}")
    if not 0 < fraction <= 1:
        raise EdgeTLError(f"--fraction must be in (0, 1], got {fraction}")
    if local_epochs < 1:
        raise EdgeTLError(f"--local-epochs must be ≥ 1, got {local_epochs}")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise EdgeTLError(f"--lr must be a positive number, got {lr}")
    if seed < 0:
        raise EdgeTLError(f"--seed must be ≥ 0, got {seed}")
    b = load_bundle(bundle)
    d = load_npz(data)
    x = check_images(d["x_train"], b.input_shape, "x_train")
    y = check_labels(d["y_train"], len(x), b.num_classes, "y_train")
    x_test = check_images(d["x_test"], b.input_shape, "x_test")
    y_test = check_labels(d["y_test"], len(x_test), b.num_classes, "y_test")
    parts = partition(y, clients, partition_scheme, seed, min_size=b.batch_size)
    check_checkpoint(checkpoint, b)  # before Ray starts
    if privacy.secagg:
        if clients < 3:
            raise EdgeTLError(f"--secagg needs at least 3 clients, got {clients}")
        # the biggest shard weighs 1: the finest quantization of the weighted tensors that cannot overflow
        privacy = replace(privacy, max_weight=float(max(len(p) for p in parts)))

    from flwr.simulation import run_simulation

    from ..runtime.fleet import client_app as device_client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("edgetl.fleet").setLevel(logging.INFO)
    random.seed(seed)  # Flower samples the round's clients with `random`
    t0 = time.perf_counter()
    report = FleetReport()
    with tempfile.TemporaryDirectory(prefix="edgetl-fleet-") as shards:
        write_shards(x, y, parts, shards)
        cfg = FleetConfig(bundle=str(bundle), x_test=x_test, y_test=y_test, rounds=rounds, clients=clients,
                          fraction=fraction, local_epochs=local_epochs, lr=lr, seed=seed,
                          min_reply_fraction=min_reply_fraction, checkpoint=checkpoint, shards=shards,
                          progress=progress, privacy=privacy)
        cpus = max(1, min(os.cpu_count() or 1, clients))
        # Flower's Ray backend sets this process's PYTHONPATH to its sys.path (this Python's stdlib
        # included) and leaves it: any Python of another version started afterwards would not start.
        pythonpath = os.environ.get("PYTHONPATH")
        try:
            run_simulation(server_app(cfg, report), client_app or device_client_app(), num_supernodes=clients,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": cpus, "num_gpus": 0}},
                           verbose_logging=verbose)
        finally:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
    if len(report.accuracy_per_round) < rounds:
        raise EdgeTLError(f"the federation stopped after {len(report.accuracy_per_round)} of {rounds} rounds "
                          f"(see the log above)")
    up, full = upload_bytes(b), full_model_bytes(b)
    return {"test_accuracy": report.accuracy_per_round[-1], "accuracy_per_round": report.accuracy_per_round,
            "initial_accuracy": report.initial_accuracy, "bytes_up_per_client_round": up,
            "full_model_bytes": full, "bytes_fraction": up / full, "rounds": rounds, "clients": clients,
            "partition": partition_scheme, "fraction": fraction, "local_epochs": local_epochs,
            "client_samples": [int(len(p)) for p in parts], "dropped": report.dropped,
            "skipped_rounds": report.skipped_rounds, "resumed_from": report.resumed_from,
            **report.wire.per_client_round(),
            **privacy.summary(secagg_sampled(clients, fraction) if privacy.secagg else sampled_clients(cfg)),
            "wall_s": time.perf_counter() - t0}
