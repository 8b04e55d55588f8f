"""The pre-flight check of a DP run: does the noise leave the model anything to learn?

DP-FedAvg adds N(0, (sigma * clip)^2) per coordinate to the round's sum and divides by the
expected cohort size K, so the mean update carries noise of std sigma * clip / K per coordinate;
over T rounds that noise walks sigma * clip * sqrt(T) / K. When the walk exceeds the RMS of the
initial weights, the noise alone moves the model further than the size of its weights: the run
trains a random walk (what fedrun's first privacy report measured: C = 500, K = 10, clip 1,
sigma 0.63-1.57, 250 rounds, a walk 18-44 x the weights' RMS). The check is printed by rank 0 before
round 1 and stored in final/privacy.json; it warns, it does not refuse.

LoRA (peft layers, W + s B A, B starting at zero) changes the scale that matters: the federated
vector is A and B, but the model uses the adapted weights W + s B A. Noise xi_B (and xi_A, when A
trains) of walk w per coordinate moves them by s (xi_B (A + xi_A)), an entry of which sums r
products: std s * sqrt(r) * w * sqrt(rms(A)^2 + w^2) (w -> 0 in the second term when A is
frozen). That is what the check compares, against the RMS of the adapted base weights W.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, List, Optional

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
    lora: Optional[dict] = None
    """LoRA models: {rank, scale, a_rms, a_noised, base_rms} of the adapted layers (their mean
    rank and scale), and the check is on the adapted weights."""

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
    def adapted_walk(self) -> Optional[float]:
        """LoRA: std of the walk's effect on the adapted weights, s sqrt(r) w sqrt(rms(A)^2 + w^2)."""
        if self.lora is None:
            return None
        w, lora = self.noise_walk, self.lora
        a_noise = w if lora["a_noised"] else 0.0
        return lora["scale"] * math.sqrt(lora["rank"]) * w * math.sqrt(lora["a_rms"] ** 2 + a_noise ** 2)

    @property
    def ratio(self) -> float:
        """What the warning compares: the walk (LoRA: its effect on the adapted weights) over the
        weights' RMS (LoRA: the adapted base weights')."""
        if self.lora is None:
            return self.walk_over_weights
        base = self.lora["base_rms"]
        return self.adapted_walk / base if base > 0 else math.inf

    @property
    def warns(self) -> bool:
        return self.ratio > 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "noise_per_coordinate": self.noise_per_coordinate,
                "noise_walk": self.noise_walk, "walk_over_weights": self.walk_over_weights,
                "adapted_walk": self.adapted_walk, "ratio": self.ratio, "warning": self.warns}

    def lines(self) -> List[str]:
        """What rank 0 prints before round 1."""
        lines = [f"privacy pre-flight: noise per coordinate of the mean update sigma*clip/K = "
                 f"{self.noise_multiplier:.4g}*{self.clip_norm:.4g}/{self.clients_per_round} = "
                 f"{self.noise_per_coordinate:.4g}; its walk over {self.rounds} rounds "
                 f"sigma*clip*sqrt(T)/K = {self.noise_walk:.4g}; initial weights' RMS "
                 f"{self.weights_rms:.4g} (walk / RMS = {self.walk_over_weights:.3g})"]
        if self.lora is not None:
            lines.append(f"privacy pre-flight, LoRA (rank {self.lora['rank']:g}, scale "
                         f"{self.lora['scale']:.3g}, A's RMS {self.lora['a_rms']:.3g}"
                         f"{'' if self.lora['a_noised'] else ', A frozen'}): the walk moves the "
                         f"adapted weights by {self.adapted_walk:.4g}, against their RMS "
                         f"{self.lora['base_rms']:.4g} (ratio {self.ratio:.3g}); this is what the "
                         "warning compares")
        if self.warns and self.lora is not None:
            lines.append(f"WARNING: the DP noise's walk moves the adapted weights by "
                         f"{self.adapted_walk:.4g}, {self.ratio:.3g}x their RMS "
                         f"({self.lora['base_rms']:.4g}): the noise alone will move the model "
                         "further than its weights' size. Sample more clients per round "
                         "(clients_per_round), train fewer rounds, or lower "
                         "privacy.noise_multiplier / clip_norm (a larger epsilon)")
        elif self.warns:
            lines.append(f"WARNING: the DP noise's walk over the run ({self.noise_walk:.4g}) "
                         f"exceeds the initial weights' RMS ({self.weights_rms:.4g}) "
                         f"{self.walk_over_weights:.3g}x: the noise alone will move the model "
                         "further than its weights' size. Sample more clients per round "
                         "(clients_per_round), train fewer rounds, or lower "
                         "privacy.noise_multiplier / clip_norm (a larger epsilon)")
        return lines


def weights_rms(weights: torch.Tensor) -> float:
    """sqrt(mean(w^2)), accumulated in float64."""
    return float(torch.linalg.vector_norm(weights.detach(), dtype=torch.float64)) / math.sqrt(weights.numel())


def lora_scales(model: Optional[torch.nn.Module]) -> Optional[dict]:
    """{rank, scale, a_rms, a_noised, base_rms} of ``model``'s peft LoRA layers (rank and scale:
    their means; RMS over all their A and base weights), None without LoRA layers."""
    if model is None:
        return None
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and m.lora_A]
    if not layers:
        return None
    a = [layer.lora_A[name].weight for layer in layers for name in layer.lora_A]
    base = [layer.get_base_layer().weight for layer in layers]
    scales = [layer.scaling[name] for layer in layers for name in layer.scaling]
    ranks = [layer.r[name] for layer in layers for name in layer.r]
    rms = lambda tensors: weights_rms(torch.cat([t.detach().flatten() for t in tensors]))  # noqa: E731
    return {"rank": sum(ranks) / len(ranks), "scale": sum(scales) / len(scales), "a_rms": rms(a),
            "a_noised": any(t.requires_grad for t in a), "base_rms": rms(base)}


def privacy_preflight(spec: "PrivacySpec", rounds: int, weights: torch.Tensor,
                      model: Optional[torch.nn.Module] = None) -> Preflight:
    """The check for a run of ``rounds`` rounds with DP parameters ``spec`` from ``weights``
    (``model``: its LoRA layers, if any, move the check to the adapted weights)."""
    return Preflight(spec.update_noise_multiplier, spec.clip_norm, spec.clients_per_round, rounds,
                     weights_rms(weights), lora_scales(model))
