"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping", NeurIPS): the clip norm follows a target quantile gamma of the clients' update norms.

    each client   b_i = 1 if ||w_c - w|| <= C (before clipping), else 0; it sends b_i - 1/2
                  (``dp_clip`` writes it into the round buffer's slot UNCLIPPED, summed by the
                  round's one all-reduce with the update)
    the server    S = sum_i (b_i - 1/2) + N(0, sigma_b^2), drawn from the round's (seed, round)
                  generator after the update's noise (``dp_noise``: the same on every rank)
                  b = clamp(S / K + 1/2, 0, 1)          K: the expected cohort size
                  C <- C * exp(-eta_C * (b - gamma))    (the geometric update)

Centring the bits (TF Privacy's ``QuantileEstimatorQuery`` does the same) halves the count's
sensitivity: adding or removing one client moves S by 1/2, so the count is a Gaussian mechanism
of multiplier 2 sigma_b. With the update's sum (sensitivity C) noised with multiplier z_Delta,
the pair is one Gaussian mechanism of multiplier z with z^-2 = z_Delta^-2 + (2 sigma_b)^-2
(Andrew et al., Theorem 1). The user gives the total z (``privacy.noise_multiplier``, or the one
``privacy.target_epsilon`` calibrates), which the accountant uses unchanged; the update's noise is
raised to z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2. Under replace-one adjacency (fixed-size
cohorts) both sensitivities double and the same z results, accounted as z / 2 like fixed
clipping. Without the noise, b counts the clients whose update fitted, / K (+ (K - n) / 2K when
n != K clients took part: the centred sum is what keeps the sensitivity 1/2); the clamp, as in
TF Privacy, is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The round buffer's scalar slot of sum_i (b_i - 1/2) (``RoundBuffer(scalars=...)``).
UNCLIPPED = "dp_unclipped"
#: sigma_b = this * K when privacy.count_noise_std is null (TFF's default; Andrew et al.: K / 20).
DEFAULT_COUNT_NOISE_PER_CLIENT = 0.05


def update_noise_multiplier(total: float, count_noise_std: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2: the update's noise multiplier that, with noise
    std ``count_noise_std`` on the centred count, spends the privacy of one Gaussian mechanism
    of multiplier ``total`` (Andrew et al., Theorem 1). ValueError unless 2 sigma_b > z."""
    if not 2.0 * count_noise_std > total:
        raise ValueError(f"2 * count noise std = {2.0 * count_noise_std:g} must exceed the total "
                         f"noise multiplier {total:g}")
    return (total ** -2 - (2.0 * count_noise_std) ** -2) ** -0.5


def centred_bit(norm: float, clip_norm: float) -> float:
    """b_i - 1/2: +1/2 when the update (norm before clipping) fits within ``clip_norm``."""
    return 0.5 if norm <= clip_norm else -0.5


def unclipped_fraction(noised_centred_sum: float, expected_clients: float) -> float:
    """b = clamp(S / K + 1/2, 0, 1), S the noised sum of the clients' b_i - 1/2."""
    return min(1.0, max(0.0, noised_centred_sum / expected_clients + 0.5))


def next_clip_norm(clip_norm: float, fraction: float, target_quantile: float,
                   learning_rate: float) -> float:
    """The geometric step C * exp(-eta_C * (b - gamma)): the clip shrinks while more than a
    fraction gamma of the clients fit within it, and grows while fewer do."""
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))


@dataclass(frozen=True)
class AdaptiveClipping:
    """The parameters of adaptive clipping, resolved (``privacy_spec``)."""

    target_quantile: float  # gamma
    learning_rate: float  # eta_C
    count_noise_std: float  # sigma_b
    update_noise_multiplier: float  # z_Delta, from the total z and sigma_b

    def step(self, clip_norm: float, noised_centred_sum: float, expected_clients: float) -> tuple:
        """(b, the next clip norm) from this round's noised centred count."""
        fraction = unclipped_fraction(noised_centred_sum, expected_clients)
        return fraction, next_clip_norm(clip_norm, fraction, self.target_quantile,
                                        self.learning_rate)


class ClipNorm:
    """The clip norm in use, shared by 'dp_clip' (which clips with it) and 'dp_noise' (which
    scales the noise by it and, under adaptive clipping, moves it after each round); every rank
    holds the same value. Checkpointed with the run."""

    def __init__(self, value: float):
        self.value = float(value)
