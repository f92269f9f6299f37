"""The fleet's privacy options, both Flower's own implementations:

- secure aggregation (SecAgg+: `flwr.server.workflow.SecAggPlusWorkflow` on the server,
  `flwr.client.mod.secaggplus_mod` on the device): the server learns only the weighted sum of the
  clients' tiny parts, never one client's. Each client quantizes its (weighted) tensors to
  `quantization_range` levels over [-clip, clip] (stochastic rounding) and masks them.
- central differential privacy with fixed clipping: each client's update (its tensors minus the
  global ones) is clipped to L2 norm `dp_clip` and Gaussian noise of std `dp_noise * dp_clip /
  sampled clients` is added to the average. Without SecAgg+ the server clips
  (`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`); with it the devices clip
  (`flwr.client.mod.fixedclipping_mod`, `flwr.server.strategy.DifferentialPrivacyClientSideFixedClipping`),
  as the server cannot see a single update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import EdgeTLError

QUANTIZATION_RANGE = 2**22  # Flower's SecAgg+ default levels; its modulus is 2**32


@dataclass
class Privacy:
    secagg: bool = False
    shares: int | float = 0.5  # int > 2: key shares per client; float in (0, 1]: of the sampled clients
    threshold: int | float = 0.667  # int: shares that rebuild a key; float: of the shares
    clip: float = 8.0  # SecAgg+ clipping range of the weighted tensors (not DP's)
    max_weight: float = 1000.0  # the most examples one client may weigh (its weight is n / max_weight)
    quantization_range: int = QUANTIZATION_RANGE
    dp_noise: float | None = None  # noise multiplier; None: no DP
    dp_clip: float | None = None  # L2 norm of a client's update

    def check(self) -> Privacy:
        if self.secagg:
            count = isinstance(self.shares, int) and not isinstance(self.shares, bool)
            if (count and self.shares < 3) or (not count and not 0 < self.shares <= 1):
                raise EdgeTLError(f"--secagg-shares must be an integer ≥ 3 or a fraction in (0, 1], "
                                  f"got {self.shares}")
            if isinstance(self.threshold, int) and not isinstance(self.threshold, bool):
                if self.threshold < 2 or (isinstance(self.shares, int) and self.threshold >= self.shares):
                    raise EdgeTLError(f"--secagg-threshold must be an integer in [2, shares) or a fraction in (0, 1], "
                                      f"got {self.threshold}")
            elif not 0 < self.threshold <= 1:
                raise EdgeTLError(f"--secagg-threshold must be an integer in [2, shares) or a fraction in (0, 1], "
                                  f"got {self.threshold}")
            if not (math.isfinite(self.clip) and self.clip > 0):
                raise EdgeTLError(f"--secagg-clip must be a positive number, got {self.clip}")
            if not (math.isfinite(self.max_weight) and self.max_weight > 0):
                raise EdgeTLError(f"the SecAgg+ max weight must be positive, got {self.max_weight}")
        if (self.dp_noise is None) != (self.dp_clip is None):
            raise EdgeTLError("differential privacy needs both --dp-noise and --dp-clip")
        if self.dp_noise is not None:
            if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
                raise EdgeTLError(f"--dp-noise must be ≥ 0, got {self.dp_noise}")
            if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
                raise EdgeTLError(f"--dp-clip must be a positive number, got {self.dp_clip}")
        return self

    def summary(self, sampled: int) -> dict:
        """The `secagg` and `dp` fields of `fleet simulate --json` (null when off)."""
        secagg = dp = None
        if self.secagg:
            secagg = {k: getattr(self, k) for k in ("shares", "threshold", "clip", "max_weight", "quantization_range")}
        if self.dp_noise is not None:
            dp = {"noise_multiplier": self.dp_noise, "clipping_norm": self.dp_clip,
                  "clipping": "client" if self.secagg else "server",
                  "noise_std": self.dp_noise * self.dp_clip / sampled}
        return {"secagg": secagg, "dp": dp}


def secagg_error_bound(privacy: Privacy, weights: list[int], max_abs: float) -> float:
    """The most SecAgg+'s quantization can move one element of the weighted average of clients
    with these example counts and tensors of at most `max_abs`, when no value was clipped: each
    client's stochastic rounding moves its weighted value by under one level (2*clip/levels),
    each weight n/max_weight is rounded to a level (by at most half of one, moving a weighted
    difference of at most 2*max_abs), and the sum is divided by the sum of the weights."""
    q = privacy.quantization_range
    total = sum(round(n / privacy.max_weight * q) for n in weights) / q
    return len(weights) * (2 * privacy.clip / q + max_abs / q) / total


def parse_number(text: str, flag: str) -> int | float:
    """'5' -> 5 (a count), '0.5' -> 0.5 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise EdgeTLError(f"{flag} must be a number, got '{text}'") from None

