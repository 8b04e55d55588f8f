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

The accountant is Google's ``dp_accounting``, RDP (``privacy.accountant=rdp``, the default) or
PLD (``pld``: privacy loss distributions, tighter; Poisson cohorts only, since its
``PLDAccountant`` refuses replace-one adjacency): the round is a Gaussian mechanism,
Poisson-subsampled with rate q (``PoissonSampledDpEvent``, add/remove-one adjacency: the sum's
sensitivity is clip_norm, dp_accounting's noise multiplier is sigma) or sampled without
replacement K of C (``SampledWithoutReplacementDpEvent``, replace-one adjacency: replacing one
client moves the sum by up to 2 * clip_norm, so the multiplier is sigma / 2), self-composed over
the rounds done. Epsilon is a function of the rounds
done, so a resumed run reports it right. With ``privacy.target_epsilon`` sigma is calibrated by
``dp_accounting.calibrate_dp_mechanism`` for ``rounds`` rounds before round 1; a budget that
needs sigma > ``privacy.max_noise_multiplier`` is refused. final/privacy.json reports both
accountants' epsilon where both apply. Adaptive clipping (``privacy.clip_quantile``,
``fedrun.fl.privacy.adaptive``) spends part of sigma on the count of unclipped clients: sigma is
the total that is accounted, the update's noise multiplier is raised to match.

What DP covers: the sequence of global models (and so final/). The simulator's diagnostics
(per-client losses and sample counts in metrics.jsonl, LoRA's aggregation error) are not
privatized: they are measurements of the simulation, not part of the protocol.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fedrun.errors import ConfigError
from fedrun.fl.privacy.adaptive import (DEFAULT_COUNT_NOISE_PER_CLIENT, AdaptiveClipping,
                                        update_noise_multiplier)

if TYPE_CHECKING:
    from fedrun.config import Config

PRIVACY_FILE = "privacy.json"  # written into final/
MIN_NOISE_MULTIPLIER = 0.05  # lower end of the calibration bracket
CALIBRATION_TOLERANCE = 1e-4  # on sigma
ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value_discretization_interval


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


def _check_pld(sampling: str) -> None:
    if sampling != "poisson":
        raise ConfigError("config key 'privacy.accountant': 'pld' accounts Poisson cohorts only "
                          f"(privacy.sampling={sampling} is analysed under replace-one adjacency, "
                          "which dp_accounting's PLDAccountant refuses)")


def make_accountant(sampling: str, accountant: str = "rdp"):
    """A fresh RDP or PLD accountant with the adjacency the sampling scheme is analysed under
    (PLD: Poisson only, a ConfigError otherwise)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    _quiet_absl()
    if accountant == "pld":
        _check_pld(sampling)
        return PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    if accountant != "rdp":
        raise ValueError(f"unknown accountant '{accountant}'")
    if sampling == "fixed":
        return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    return RdpAccountant()


@functools.lru_cache(maxsize=64)
def _pld_of_one_round(sampling_rate: float, noise_multiplier: float):
    """The PLD of one Poisson-subsampled Gaussian round, as PLDAccountant builds it for a
    ``PoissonSampledDpEvent`` (add/remove-one). Building it dominates the cost (about 0.6 s, the
    self-composition and epsilon 0.3 s more), and every round's record needs an epsilon."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sampling_rate,
        value_discretization_interval=PLD_DISCRETIZATION)


def _pld_epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """PLDAccountant's epsilon for ``rounds`` self-composed rounds, bit for bit (it composes the
    self-composed PLD onto the identity; tested against the accountant), with the one-round PLD
    cached."""
    from dp_accounting.pld import privacy_loss_distribution

    composed = privacy_loss_distribution.identity(PLD_DISCRETIZATION).compose(
        _pld_of_one_round(sampling_rate, noise_multiplier).self_compose(rounds))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=4096)
def compute_epsilon(num_clients: int, clients_per_round: int, sampling: str,
                    noise_multiplier: float, rounds: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Epsilon after ``rounds`` rounds (0 before any): dp_accounting's RDP or PLD value."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier == 0:  # the clip-only control releases its updates unnoised
        return math.inf
    if accountant == "pld":
        _check_pld(sampling)
        return _pld_epsilon(clients_per_round / num_clients, noise_multiplier, rounds, delta)
    import dp_accounting

    tracker = make_accountant(sampling, accountant)
    tracker.compose(dp_accounting.SelfComposedDpEvent(
        round_event(num_clients, clients_per_round, sampling, noise_multiplier), rounds))
    return float(tracker.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(num_clients: int, clients_per_round: int, sampling: str,
                               rounds: int, target_epsilon: float, delta: float,
                               max_noise_multiplier: float, accountant: str = "rdp") -> float:
    """The smallest sigma (to CALIBRATION_TOLERANCE) whose epsilon after ``rounds`` rounds is at
    most ``target_epsilon`` under ``accountant``; a ConfigError when even
    ``max_noise_multiplier`` is not enough."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval

    def event(sigma: float):
        return dp_accounting.SelfComposedDpEvent(
            round_event(num_clients, clients_per_round, sampling, sigma), rounds)

    worst = compute_epsilon(num_clients, clients_per_round, sampling, max_noise_multiplier,
                            rounds, delta, accountant)
    if not worst <= target_epsilon:
        raise ConfigError(
            f"config key 'privacy.target_epsilon': {target_epsilon} cannot be met within "
            f"rounds={rounds} ({clients_per_round} of {num_clients} clients per round, "
            f"{sampling} sampling, delta={delta}, {accountant}): even noise_multiplier="
            f"{max_noise_multiplier:g} (privacy.max_noise_multiplier) gives epsilon={worst:.3g}. "
            "Train fewer rounds, sample fewer clients per round, raise the budget, or raise "
            "privacy.max_noise_multiplier if such noise is really meant")
    low, high = MIN_NOISE_MULTIPLIER, max_noise_multiplier
    if accountant == "pld":
        low, high = _pld_bracket(num_clients, clients_per_round, rounds, target_epsilon, delta,
                                 max_noise_multiplier)
    if compute_epsilon(num_clients, clients_per_round, sampling, low, rounds,
                       delta, accountant) <= target_epsilon:
        return low  # MIN_NOISE_MULTIPLIER: a bracket's lower end meets the target only there
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(sampling, accountant), event, target_epsilon, delta,
        bracket_interval=ExplicitBracketInterval(low, high), tol=CALIBRATION_TOLERANCE))


def _pld_bracket(num_clients: int, clients_per_round: int, rounds: int, target_epsilon: float,
                 delta: float, max_noise_multiplier: float) -> tuple:
    """An interval holding PLD's calibrated sigma, found without evaluating PLD at small sigma:
    its cost grows fast as sigma falls (one 300-round epsilon at q = 0.01: 1 s at sigma 1, 13 s
    at 0.2, 150 s at 0.05). RDP's sigma for the same target is an upper end (PLD is the tighter
    bound; checked, and raised if not), and the lower end steps down from it by 1.25 until
    PLD's epsilon exceeds the target (or MIN_NOISE_MULTIPLIER is reached)."""
    def epsilon(sigma: float) -> float:
        return compute_epsilon(num_clients, clients_per_round, "poisson", sigma, rounds, delta, "pld")

    try:
        high = calibrate_noise_multiplier(num_clients, clients_per_round, "poisson", rounds,
                                          target_epsilon, delta, max_noise_multiplier, "rdp")
    except ConfigError:  # RDP cannot meet it; PLD can (the caller checked max_noise_multiplier)
        high = max_noise_multiplier
    while epsilon(high) > target_epsilon:
        high = min(max_noise_multiplier, high * 1.25)
    low = high
    while low > MIN_NOISE_MULTIPLIER and epsilon(low) <= target_epsilon:
        low = max(MIN_NOISE_MULTIPLIER, low / 1.25)
    return low, high


_ACCOUNTANT_CLASSES = {"rdp": "dp_accounting.rdp.RdpAccountant",
                       "pld": "dp_accounting.pld.PLDAccountant"}


@dataclass(frozen=True)
class PrivacySpec:
    """What DP-FedAvg runs with: the resolved noise multiplier and what the accountant needs."""

    num_clients: int
    clients_per_round: int  # K: the expected cohort size, the fixed denominator
    sampling: str
    clip_norm: float  # the initial one under adaptive clipping
    noise_multiplier: float  # the total sigma that is accounted
    delta: float
    calibrated_for: Optional[dict] = None  # {"target_epsilon", "rounds"} when calibrated
    accountant: str = "rdp"  # whose epsilon the records report (and calibration uses)
    adaptive: Optional[AdaptiveClipping] = None  # adaptive clipping, when privacy.clip_quantile

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the update's noise: sigma, or z_Delta >= sigma under adaptive
        clipping (part of the budget goes to the count of unclipped clients)."""
        return self.adaptive.update_noise_multiplier if self.adaptive else self.noise_multiplier

    @property
    def noise_std(self) -> float:
        """Per-coordinate std of the noise added to the round's sum (at the initial clip)."""
        return self.update_noise_multiplier * self.clip_norm

    def epsilon(self, rounds_done: int, accountant: Optional[str] = None) -> float:
        return compute_epsilon(self.num_clients, self.clients_per_round, self.sampling,
                               self.noise_multiplier, rounds_done, self.delta,
                               accountant or self.accountant)

    def epsilons(self, rounds_done: int) -> dict:
        """Epsilon of each accountant that applies ('pld': Poisson only, else None)."""
        return {name: (self.epsilon(rounds_done, name)
                       if name == "rdp" or self.sampling == "poisson" else None)
                for name in ACCOUNTANTS}

    def report(self, rounds_done: int) -> dict:
        """The guarantee after ``rounds_done`` rounds (privacy.json, the W&B summary)."""
        epsilons = self.epsilons(rounds_done)
        adaptive = None
        if self.adaptive is not None:
            adaptive = {"target_quantile": self.adaptive.target_quantile,
                        "clip_lr": self.adaptive.learning_rate,
                        "count_noise_std": self.adaptive.count_noise_std,
                        "update_noise_multiplier": self.adaptive.update_noise_multiplier,
                        "initial_clip_norm": self.clip_norm}
        return {"epsilon": epsilons[self.accountant], "delta": self.delta, "rounds": rounds_done,
                "epsilon_rdp": epsilons["rdp"], "epsilon_pld": epsilons["pld"],
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "sampling": self.sampling, "sampling_rate": self.sampling_rate,
                "num_clients": self.num_clients, "clients_per_round": self.clients_per_round,
                "calibrated_for": self.calibrated_for,
                "accountant": _ACCOUNTANT_CLASSES[self.accountant] + " ("
                              + ("replace-one, sampled without replacement" if self.sampling == "fixed"
                                 else "add/remove-one, Poisson sampled") + ")",
                "sensitivity": f"{SENSITIVITY[self.sampling]:g} x clip_norm",
                "accountant_noise_multiplier": accountant_noise_multiplier(self.sampling,
                                                                           self.noise_multiplier),
                "adaptive_clipping": adaptive,
                "unit": "client-level (one client's whole data)"}


def _adaptive_clipping(cfg: "Config", sigma: float) -> Optional[AdaptiveClipping]:
    """Adaptive clipping's parameters (None with a fixed clip): sigma_b and the update's share
    z_Delta of the total sigma; a ConfigError when sigma_b is too small to leave one."""
    p = cfg.privacy
    if p.clip_quantile is None:
        return None
    if sigma == 0:  # the clip-only control: the exact count of unclipped clients
        return AdaptiveClipping(p.clip_quantile, p.clip_lr, 0.0, 0.0)
    count_noise = (p.count_noise_std if p.count_noise_std is not None
                   else DEFAULT_COUNT_NOISE_PER_CLIENT * cfg.cohort_size)
    try:
        update_sigma = update_noise_multiplier(sigma, count_noise)
    except ValueError as exc:
        raise ConfigError(
            f"config key 'privacy.count_noise_std': {exc} (null means 0.05 x clients_per_round = "
            f"{DEFAULT_COUNT_NOISE_PER_CLIENT * cfg.cohort_size:g}): adaptive clipping spends part "
            "of the noise budget on the count of unclipped clients; raise privacy.count_noise_std, "
            "sample more clients per round, or lower the noise") from None
    return AdaptiveClipping(p.clip_quantile, p.clip_lr, float(count_noise), float(update_sigma))


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
                                           p.target_epsilon, p.delta, p.max_noise_multiplier,
                                           p.accountant)
        calibrated_for = {"target_epsilon": p.target_epsilon, "rounds": cfg.rounds}
    return PrivacySpec(cfg.num_clients, cfg.cohort_size, p.sampling, p.clip_norm, float(sigma),
                       p.delta, calibrated_for, p.accountant, _adaptive_clipping(cfg, float(sigma)))


def write_privacy_file(spec: PrivacySpec, rounds_done: int, folder: Path,
                       extra: Optional[dict] = None) -> dict:
    """final/privacy.json: the guarantee of the exported model (plus ``extra``: the pre-flight
    check, adaptive clipping's final clip norm)."""
    report = spec.report(rounds_done)
    if spec.noise_multiplier == 0:  # strict JSON has no infinity (metrics.jsonl writes null too)
        report.update(epsilon=None, epsilon_rdp=None, epsilon_pld=None,
                      epsilon_note="infinite: noise_multiplier 0, the clip-only control")
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(report.get(key), dict):
            report[key] = {**report[key], **value}
        else:
            report[key] = value
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / PRIVACY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- the transforms


