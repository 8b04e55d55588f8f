"""The pre-flight check of a DP run: does the noise leave the model anything to learn?

DP-FedAvg adds N(0, (sigma * clip)^2) per coordinate to the round's sum and divides by the
expected cohort size K, so the mean update carries noise of std sigma * clip / K per coordinate;
over T rounds that noise walks sigma * clip * sqrt(T) / K. When the walk exceeds the RMS of the
initial weights, the noise alone moves the model further than the size of its weights: the run
trains a random walk (what fedrun's first privacy report measured: C = 500, K = 10, clip 1,
sigma 0.63-1.57, 250 rounds, a walk 18-44 x the weights' RMS). The check is printed by rank 0 before
round 1 and stored in final/privacy.json; it warns, it does not refuse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, List

import torch

if TYPE_CHECKING:
    from fedrun.fl.privacy.accountant import PrivacySpec


@dataclass(frozen=True)
class Preflight:
    """The arithmetic of the check: everything follows from these five numbers."""

    noise_multiplier: float  # of the update's noise (z_Delta under adaptive clipping)
    clip_norm: float  # the initial clip under adaptive clipping
    clients_per_round: int  # K: the fixed denominator
    rounds: int  # T
    weights_rms: float  # RMS of the initial federated vector

    @property
    def noise_per_coordinate(self) -> float:
        """std of the noise on the mean update, per coordinate and round: sigma * clip / K."""
        return self.noise_multiplier * self.clip_norm / self.clients_per_round

    @property
    def noise_walk(self) -> float:
        """std of the noise summed over the run, per coordinate: sigma * clip * sqrt(T) / K."""
        return self.noise_per_coordinate * math.sqrt(self.rounds)

    @property
    def walk_over_weights(self) -> float:
        return self.noise_walk / self.weights_rms if self.weights_rms > 0 else math.inf

    @property
    def warns(self) -> bool:
        return self.noise_walk > self.weights_rms

    def as_dict(self) -> dict:
        return {**asdict(self), "noise_per_coordinate": self.noise_per_coordinate,
                "noise_walk": self.noise_walk, "walk_over_weights": self.walk_over_weights,
                "warning": self.warns}

    def lines(self) -> List[str]:
        """What rank 0 prints before round 1."""
        lines = [f"privacy pre-flight: noise per coordinate of the mean update sigma*clip/K = "
                 f"{self.noise_multiplier:.4g}*{self.clip_norm:.4g}/{self.clients_per_round} = "
                 f"{self.noise_per_coordinate:.4g}; its walk over {self.rounds} rounds "
                 f"sigma*clip*sqrt(T)/K = {self.noise_walk:.4g}; initial weights' RMS "
                 f"{self.weights_rms:.4g} (walk / RMS = {self.walk_over_weights:.3g})"]
        if self.warns:
            lines.append(f"WARNING: the DP noise's walk over the run ({self.noise_walk:.4g}) "
                         f"exceeds the initial weights' RMS ({self.weights_rms:.4g}) "
                         f"{self.walk_over_weights:.3g}x: the noise alone will move the model "
                         "further than its weights' size. Sample more clients per round "
                         "(clients_per_round), train fewer rounds, or lower "
                         "privacy.noise_multiplier / clip_norm (a larger epsilon)")
        return lines


def weights_rms(weights: torch.Tensor) -> float:
    """sqrt(mean(w^2)), accumulated in float64."""
    return float(torch.linalg.vector_norm(weights, dtype=torch.float64)) / math.sqrt(weights.numel())


def privacy_preflight(spec: "PrivacySpec", rounds: int, weights: torch.Tensor) -> Preflight:
    """The check for a run of ``rounds`` rounds with DP parameters ``spec`` from ``weights``."""
    return Preflight(spec.update_noise_multiplier, spec.clip_norm, spec.clients_per_round, rounds,
                     weights_rms(weights))
