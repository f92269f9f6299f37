"""Flower's Deployment Runtime: the ServerApp a SuperLink runs (`edgetl.fleet.deploy:app`) and the
Flower App folder that `flwr run` submits. Each SuperNode runs `edgetl.runtime.fleet:app` with
its own bundle and data file in its node config.

    flower-superlink --insecure
    flower-supernode --insecure --superlink HOST:9092 --node-config "bundle='B' data='D.npz'"
    flwr run APP_DIR CONNECTION --stream      # APP_DIR from write_app()

The ServerApp reads its settings from the run config and writes the summary to `out` (JSON).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.serverapp import ServerApp

from ..runtime.data import load_npz
from .privacy import Privacy
from .server import FleetConfig, FleetReport, run_server

app = ServerApp()


@app.main()
def main(grid, context) -> None:
    c = context.run_config
    data = load_npz(str(c["test-data"]))
    cfg = FleetConfig(bundle=str(c["bundle"]), x_test=data["x_test"], y_test=data["y_test"], rounds=int(c["rounds"]),
                      clients=int(c["clients"]), fraction=float(c["fraction"]), local_epochs=int(c["local-epochs"]),
                      lr=float(c["lr"]) or None, seed=int(c["seed"]),
                      min_reply_fraction=float(c["min-reply-fraction"]), checkpoint=str(c["checkpoint"]) or None,
                      round_timeout=float(c["round-timeout"]), privacy=_privacy(c))
    t0 = time.perf_counter()
    report = run_server(grid, cfg, FleetReport(), context)
    out = {"test_accuracy": report.accuracy_per_round[-1] if report.accuracy_per_round else None,
           "accuracy_per_round": report.accuracy_per_round, "initial_accuracy": report.initial_accuracy,
           "rounds": cfg.rounds, "clients": cfg.clients, "dropped": report.dropped,
           "skipped_rounds": report.skipped_rounds, "resumed_from": report.resumed_from,
           **report.wire.per_client_round(), **cfg.privacy.summary(_sampled(cfg)),
           "wall_s": time.perf_counter() - t0}
    if c.get("out"):
        Path(str(c["out"])).write_text(json.dumps(out))


def _privacy(c) -> Privacy:
    """The run config's privacy settings (a negative --dp-noise: no DP)."""
    number = lambda v: v if isinstance(v, int) else float(v)  # noqa: E731 (an int is a count, a float a fraction)
    dp = float(c.get("dp-noise", -1.0)) >= 0
    return Privacy(secagg=bool(c.get("secagg", False)), shares=number(c.get("secagg-shares", 0.5)),
                   threshold=number(c.get("secagg-threshold", 0.667)), clip=float(c.get("secagg-clip", 8.0)),
                   max_weight=float(c.get("secagg-max-weight", 1000.0)),
                   dp_noise=float(c["dp-noise"]) if dp else None, dp_clip=float(c["dp-clip"]) if dp else None).check()


def _sampled(cfg: FleetConfig) -> int:
    from .secagg import secagg_sampled
    from .server import sampled_clients

    return secagg_sampled(cfg.clients, cfg.fraction) if cfg.privacy.secagg else sampled_clients(cfg)


def _toml(v) -> str:
    return json.dumps(v) if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else repr(v)


def write_app(folder: str | Path, bundle: str, test_data: str, rounds: int, clients: int, out: str = "",
              fraction: float = 1.0, local_epochs: int = 1, lr: float = 0.0, seed: int = 0,
              min_reply_fraction: float = 0.5, checkpoint: str = "", round_timeout: float = 600.0,
              privacy: Privacy | None = None) -> Path:
    """A Flower App folder (pyproject.toml only: the apps are edgetl's own modules) for `flwr run`.
    lr 0: the bundle's; checkpoint '': none; out '': no summary file. `privacy.max_weight`: the
    most examples one device holds (SecAgg+ weighs a device n / max_weight)."""
    p = (privacy or Privacy()).check()
    config = {"bundle": str(Path(bundle).resolve()), "test-data": str(Path(test_data).resolve()), "rounds": rounds,
              "clients": clients, "fraction": float(fraction), "local-epochs": local_epochs, "lr": float(lr),
              "seed": seed, "min-reply-fraction": float(min_reply_fraction),
              "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else "",
              "round-timeout": float(round_timeout), "out": str(Path(out).resolve()) if out else "",
              "secagg": p.secagg, "secagg-shares": p.shares, "secagg-threshold": p.threshold,
              "secagg-clip": float(p.clip), "secagg-max-weight": float(p.max_weight),
              "dp-noise": -1.0 if p.dp_noise is None else float(p.dp_noise),
              "dp-clip": 1.0 if p.dp_clip is None else float(p.dp_clip)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "edgetl-fleet"', 'version = "1.0.0"',
             'description = "Federated training of an edgetl bundle\'s tiny parts"', 'license = "Apache-2.0"',
             'dependencies = []', '', '[tool.flwr.app]', 'publisher = "edgetl"', '',
             '[tool.flwr.app.components]', 'serverapp = "edgetl.fleet.deploy:app"',
             'clientapp = "edgetl.runtime.fleet:app"', '', '[tool.flwr.app.config]',
             *(f"{k} = {_toml(v)}" for k, v in config.items())]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder
