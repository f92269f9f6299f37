"""Rounds under secure aggregation: Flower 1.42 runs its SecAgg+ protocol only in the legacy
workflow (`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with a `LegacyContext` and a
`flwr.server.strategy` strategy), so these rounds use it, with the same round numbering,
evaluation, checkpoint and drop log as the Message-API rounds. The server sees only the secure
weighted average (and each client's example count and bundle id, which are not masked)."""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

log = logging.getLogger("edgetl.fleet")


def secagg_sampled(clients: int, fraction: float) -> int:
    """How many clients a SecAgg+ round samples (Flower's legacy FedAvg; SecAgg+ needs two)."""
    return max(int(clients * fraction), 2)


def run_secagg(grid, context, cfg, report, shapes: dict[str, tuple], digest: str, arrays: dict[str, np.ndarray],
               done: int, config: dict, evaluate_arrays: Callable[[int, dict], float | None]) -> None:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from .server import client_failure

    names, p = list(shapes), cfg.privacy
    sampled = secagg_sampled(cfg.clients, cfg.fraction)

    def skip(r: int, why: str):
        report.skipped_rounds.append(r)
        log.warning("round %d: %s; the global tiny parts are kept", r, why)
        return None, {}

    class SecureTinyPartsFedAvg(FedAvg):
        def note_failures(self, server_round: int, failures) -> None:
            seen = set()  # Flower's SecAgg+ workflow lists a client that failed in its training twice
            for f in failures:
                err = f.args[0] if isinstance(f, Exception) and f.args else f
                if id(err) in seen:
                    continue
                seen.add(id(err))
                why = client_failure(str(getattr(err, "reason", err)))
                # the workflow keeps the error, not the node: node -1
                report.dropped.append({"round": server_round + done, "node": -1, "reason": why})
                log.warning("round %d: dropped a client of the secure sum: %s", server_round + done, why)

        def aggregate_fit(self, server_round, results, failures):
            r = server_round + done
            self.note_failures(server_round, failures)
            need = max(2, math.ceil(cfg.min_reply_fraction * sampled))
            if len(results) < need:
                return skip(r, f"{len(results)} of {sampled} clients are in the secure sum, {need} needed")
            others = [str(res.metrics.get("bundle", "?"))[:12] for _, res in results
                      if res.metrics.get("bundle") != digest]
            if others:  # their tensors are in the sum and cannot be taken out of it
                return skip(r, f"{len(others)} clients' tensors are of another bundle ({others[0]}…)")
            agg = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the secure average
            if [tuple(a.shape) for a in agg] != [tuple(shapes[n]) for n in names]:
                return skip(r, "the secure sum does not have the bundle's tensor shapes")
            if not all(np.isfinite(a).all() for a in agg):
                return skip(r, "the secure sum is not finite")
            return ndarrays_to_parameters([np.asarray(a, np.float32) for a in agg]), {}

    def evaluate(server_round, ndarrays, _config):
        acc = evaluate_arrays(server_round, {n: np.asarray(a, np.float32) for n, a in zip(names, ndarrays)})
        return None if acc is None else (0.0, {"accuracy": acc})

    strategy = SecureTinyPartsFedAvg(
        fraction_fit=cfg.fraction, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=cfg.clients,
        evaluate_fn=evaluate, on_fit_config_fn=lambda rnd: {**config, "server-round": rnd + done},
        initial_parameters=ndarrays_to_parameters([np.asarray(arrays[n], np.float32) for n in names]))
    if p.dp_noise is not None:
        inner = strategy

        class ClientClippedDP(DifferentialPrivacyClientSideFixedClipping):
            def aggregate_fit(self, server_round, results, failures):
                inner.note_failures(server_round, failures)  # SecAgg+ already left them out of the sum
                return super().aggregate_fit(server_round, results, [])

        strategy = ClientClippedDP(inner, p.dp_noise, p.dp_clip, sampled)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.rounds - done, round_timeout=cfg.round_timeout),
                           strategy=strategy)
    workflow = SecAggPlusWorkflow(num_shares=p.shares, reconstruction_threshold=p.threshold, max_weight=p.max_weight,
                                  clipping_range=p.clip, quantization_range=p.quantization_range,
                                  timeout=cfg.round_timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
