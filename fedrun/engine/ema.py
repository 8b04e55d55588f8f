"""The server-side exponential moving average of the global weights (sampling, export)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedrun.config import EMAConfig


class EMA:
    """Exponential moving average of the global weights, updated once per round.

    Update r (0-based) uses the decay min(decay, r / (r + 1)): until the average spans its
    horizon it is the running mean of every round's weights so far (the random initialisation
    gets weight 0), then it decays by ``decay`` per round. The warm-up therefore ends after
    ceil(decay / (1 - decay)) updates, whatever the run's length.

    The horizon is the mean age of what the average holds, ages counted in rounds since the
    weights were produced (the last round's weights have age 0). A constant decay d gives
    weights (1 - d) d^a to age a, whose mean age is d / (1 - d) rounds; the warm-up's running
    mean of m rounds has mean age (m - 1) / 2 < d / (1 - d), and every later update moves the
    mean age a to d (a + 1), so it rises monotonically towards d / (1 - d) and never exceeds it.
    ``fedrun compare`` sets d = H / (H + S) for a horizon of H samples at S samples per round
    (d / (1 - d) rounds = H samples).

    (diffusers' EMAModel warms up as min(decay, (1 + r) / (10 + r)) per step; per round that cap
    stays below a decay of 0.975 for 350 rounds, and its mean age is about a tenth of the run
    whatever the decay, so a per-round decay would have no effect in runs of a few hundred
    rounds.)
    """

    def __init__(self, weights: torch.Tensor, cfg: "EMAConfig"):
        self.cfg = cfg
        self.shadow = weights.detach().clone()
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        return min(self.cfg.decay, updates / (updates + 1))

    def update(self, weights: torch.Tensor) -> None:
        if not self.cfg.enabled:
            self.shadow.copy_(weights)
            return
        decay = self.decay_at(self.updates)
        self.shadow.mul_(decay).add_(weights, alpha=1 - decay)
        self.updates += 1
