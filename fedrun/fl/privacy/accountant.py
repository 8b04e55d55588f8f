"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018) and its accountant.

    Step 1  cohort: Poisson sampling (each client independently with rate q = K / C) or fixed
            size K without replacement (``privacy.sampling``; ``fedrun.engine.cohort``), from (seed, round)
    Step 2  'dp_clip' (update transform): each client's whole update, the flat vector
            local - global, is scaled to L2 norm <= clip_norm; clients weigh 1 (uniform)
    Step 3  the one all-reduce sums the clipped updates (exactly, with aggregation.exact)
    Step 4  'dp_noise' (server transform): N(0, (sigma * clip_norm)^2) per coordinate is added once
            to the reduced sum, drawn from the round's generator (seed, round), so every rank adds
            the same noise without a broadcast; the server step divides by the *expected* cohort
            size q * C = K (McMahan et al.'s fixed-denominator estimator), never by the actual
            count of clients, which would depend on who took part. A round whose Poisson cohort
            is empty still releases (and applies) the noise.

The accountant is Google's ``dp_accounting`` (RDP): the round is a Gaussian mechanism,
Poisson-subsampled with rate q (``PoissonSampledDpEvent``, add/remove-one adjacency: the sum's
sensitivity is clip_norm, dp_accounting's noise multiplier is sigma) or sampled without
replacement K of C (``SampledWithoutReplacementDpEvent``, replace-one adjacency: replacing one
client moves the sum by up to 2 * clip_norm, so the multiplier is sigma / 2), self-composed over
the rounds done. Epsilon is a function of the rounds
done, so a resumed run reports it right. With ``privacy.target_epsilon`` sigma is calibrated by
``dp_accounting.calibrate_dp_mechanism`` for ``rounds`` rounds before round 1; a budget that
needs sigma > ``privacy.max_noise_multiplier`` is refused.

What DP covers: the sequence of global models (and so final/). The simulator's diagnostics
(per-client losses and sample counts in metrics.jsonl, LoRA's aggregation error) are not
privatized: they are measurements of the simulation, not part of the protocol.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fedrun.errors import ConfigError

if TYPE_CHECKING:
    from fedrun.config import Config

PRIVACY_FILE = "privacy.json"  # written into final/
MIN_NOISE_MULTIPLIER = 0.05  # lower end of the calibration bracket
CALIBRATION_TOLERANCE = 1e-4  # on sigma


# ---------------------------------------------------------------- the accountant

def _quiet_absl() -> None:
    # dp_accounting warns through absl for every fractional RDP order whose series does not
    # converge (it then drops that order): many lines per round, no information for the user.
    logging.getLogger("absl").setLevel(logging.ERROR)


#: L2 sensitivity of the round's sum of clipped updates, in units of clip_norm, under the
#: adjacency each sampling scheme is accounted with: adding or removing one client moves the sum
#: by at most one clipped update; replacing one client by another moves it by up to two.
SENSITIVITY = {"poisson": 1.0, "fixed": 2.0}


def accountant_noise_multiplier(sampling: str, noise_multiplier: float) -> float:
    """dp_accounting's noise multiplier for fedrun's sigma: "the ratio of the standard deviation
    of the Gaussian noise to the l2-sensitivity of the function to which it is added" (its
    ``_compute_rdp_sample_wor_gaussian``) under the event's adjacency. The noise std is
    sigma * clip_norm; the sensitivity is clip_norm (Poisson, add/remove-one) or 2 * clip_norm
    (fixed-size cohorts, replace-one): sigma, or sigma / 2."""
    if sampling not in SENSITIVITY:
        raise ValueError(f"unknown sampling '{sampling}'")
    return noise_multiplier / SENSITIVITY[sampling]


def round_event(num_clients: int, clients_per_round: int, sampling: str, noise_multiplier: float):
    """The dp_accounting event of one round of DP-FedAvg with noise std sigma * clip_norm."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(accountant_noise_multiplier(sampling, noise_multiplier))
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)


def make_accountant(sampling: str):
    """A fresh RDP accountant with the adjacency the sampling scheme is analysed under."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    _quiet_absl()
    if sampling == "fixed":
        return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    return RdpAccountant()


@functools.lru_cache(maxsize=4096)
def compute_epsilon(num_clients: int, clients_per_round: int, sampling: str,
                    noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` rounds (0 before any): dp_accounting's RDP value."""
    if rounds <= 0:
        return 0.0
    import dp_accounting

    accountant = make_accountant(sampling)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        round_event(num_clients, clients_per_round, sampling, noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(num_clients: int, clients_per_round: int, sampling: str,
                               rounds: int, target_epsilon: float, delta: float,
                               max_noise_multiplier: float) -> float:
    """The smallest sigma (to CALIBRATION_TOLERANCE) whose epsilon after ``rounds`` rounds is at
    most ``target_epsilon``; a ConfigError when even ``max_noise_multiplier`` is not enough."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval

    def event(sigma: float):
        return dp_accounting.SelfComposedDpEvent(
            round_event(num_clients, clients_per_round, sampling, sigma), rounds)

    worst = compute_epsilon(num_clients, clients_per_round, sampling, max_noise_multiplier,
                            rounds, delta)
    if not worst <= target_epsilon:
        raise ConfigError(
            f"config key 'privacy.target_epsilon': {target_epsilon} cannot be met within "
            f"rounds={rounds} ({clients_per_round} of {num_clients} clients per round, "
            f"{sampling} sampling, delta={delta}): even noise_multiplier="
            f"{max_noise_multiplier:g} (privacy.max_noise_multiplier) gives epsilon={worst:.3g}. "
            "Train fewer rounds, sample fewer clients per round, raise the budget, or raise "
            "privacy.max_noise_multiplier if such noise is really meant")
    if compute_epsilon(num_clients, clients_per_round, sampling, MIN_NOISE_MULTIPLIER, rounds,
                       delta) <= target_epsilon:
        return MIN_NOISE_MULTIPLIER
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(sampling), event, target_epsilon, delta,
        bracket_interval=ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, max_noise_multiplier),
        tol=CALIBRATION_TOLERANCE))


@dataclass(frozen=True)
class PrivacySpec:
    """What DP-FedAvg runs with: the resolved noise multiplier and what the accountant needs."""

    num_clients: int
    clients_per_round: int  # K: the expected cohort size, the fixed denominator
    sampling: str
    clip_norm: float
    noise_multiplier: float
    delta: float
    calibrated_for: Optional[dict] = None  # {"target_epsilon", "rounds"} when calibrated

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def noise_std(self) -> float:
        """Per-coordinate std of the noise added to the round's sum."""
        return self.noise_multiplier * self.clip_norm

    def epsilon(self, rounds_done: int) -> float:
        return compute_epsilon(self.num_clients, self.clients_per_round, self.sampling,
                               self.noise_multiplier, rounds_done, self.delta)

    def report(self, rounds_done: int) -> dict:
        """The guarantee after ``rounds_done`` rounds (privacy.json, the W&B summary)."""
        return {"epsilon": self.epsilon(rounds_done), "delta": self.delta, "rounds": rounds_done,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "sampling": self.sampling, "sampling_rate": self.sampling_rate,
                "num_clients": self.num_clients, "clients_per_round": self.clients_per_round,
                "calibrated_for": self.calibrated_for,
                "accountant": "dp_accounting.rdp.RdpAccountant ("
                              + ("replace-one, sampled without replacement" if self.sampling == "fixed"
                                 else "add/remove-one, Poisson sampled") + ")",
                "sensitivity": f"{SENSITIVITY[self.sampling]:g} x clip_norm",
                "accountant_noise_multiplier": accountant_noise_multiplier(self.sampling,
                                                                           self.noise_multiplier),
                "unit": "client-level (one client's whole data)"}


def privacy_spec(cfg: "Config") -> PrivacySpec:
    """The run's DP parameters; sigma calibrated for ``cfg.rounds`` when ``target_epsilon`` is set
    (raises ConfigError when the budget cannot be met)."""
    p = cfg.privacy
    if not p.enabled:
        raise ConfigError("config key 'privacy.enabled': DP-FedAvg is off in this config")
    calibrated_for = None
    sigma = p.noise_multiplier
    if p.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(cfg.num_clients, cfg.cohort_size, p.sampling, cfg.rounds,
                                           p.target_epsilon, p.delta, p.max_noise_multiplier)
        calibrated_for = {"target_epsilon": p.target_epsilon, "rounds": cfg.rounds}
    return PrivacySpec(cfg.num_clients, cfg.cohort_size, p.sampling, p.clip_norm, float(sigma),
                       p.delta, calibrated_for)


def write_privacy_file(spec: PrivacySpec, rounds_done: int, folder: Path) -> dict:
    """final/privacy.json: the guarantee of the exported model."""
    report = spec.report(rounds_done)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / PRIVACY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- the transforms


