"""DP-FedAvg's two transforms: 'dp_clip' (the last update transform: each client's whole update
scaled to L2 norm <= privacy.clip_norm, exactly) and 'dp_noise' (a server transform: Gaussian
noise of std sigma * clip_norm added once to the round's sum, from the (seed, round) stream, so
every rank adds the same noise without a broadcast). The accounting is in ``accountant``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from fedrun.errors import ConfigError
from fedrun.fl.aggregation.transforms import RoundInfo, ServerTransform, UpdateInfo, UpdateTransform
from fedrun.fl.privacy.accountant import privacy_spec
from fedrun.registry import SERVER_TRANSFORMS, UPDATE_TRANSFORMS

if TYPE_CHECKING:
    from fedrun.config import Config


def _norm(delta: torch.Tensor) -> float:
    # accumulated in float64: it does not depend on the fp32 summation order
    return float(torch.linalg.vector_norm(delta, dtype=torch.float64))


def clip_to_norm_(delta: torch.Tensor, clip_norm: float) -> float:
    """Scale ``delta`` in place to L2 norm <= ``clip_norm``, exactly (the float64 norm of the
    fp32 result); returns its norm before clipping. Scaling rounds every coordinate to fp32,
    which can leave the norm a few ulps above the bound (0.5000000005 for 0.5): the result is
    then shrunk by one fp32 ulp per coordinate until it is within."""
    norm = _norm(delta)
    if norm <= clip_norm:
        return norm
    delta.mul_(clip_norm / norm)
    for _ in range(64):
        if _norm(delta) <= clip_norm:
            return norm
        # x * (1 - 2**-23) rounds to at least one ulp below |x| (zeros stay zero)
        delta.mul_(1.0 - 2.0 ** -23)
    raise FloatingPointError(f"could not clip an update of norm {norm} to {clip_norm}")


@UPDATE_TRANSFORMS.register("dp_clip")
class DpClip(UpdateTransform):
    """Step 2: the client's update scaled to L2 norm <= privacy.clip_norm (never rejected). With
    exact aggregation the bound is lowered by the grid's rounding bound, so that the rounded
    term that enters the sum is within privacy.clip_norm too."""

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        super().__init__(cfg, params)
        if cfg is None:
            raise ConfigError("update transform 'dp_clip' needs the config (privacy.clip_norm)")
        self.clip_norm = cfg.privacy.clip_norm

    def __call__(self, delta: torch.Tensor, info: UpdateInfo) -> Optional[str]:
        bound = self.clip_norm - info.rounding_bound
        if bound <= 0.5 * self.clip_norm:
            raise ConfigError(f"config key 'privacy.clip_norm': {self.clip_norm} is below twice the "
                              f"exact grid's rounding error {info.rounding_bound:.3g}; raise it or "
                              "set aggregation.exact=false")
        clip_to_norm_(delta, bound)
        return None


@SERVER_TRANSFORMS.register("dp_noise")
class DpNoise(ServerTransform):
    """Step 4: N(0, (sigma * clip_norm)^2) per coordinate added to the reduced sum, from the
    round's (seed, round) stream; reports the guarantee after this round."""

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        super().__init__(cfg, params)
        if cfg is None:
            raise ConfigError("server transform 'dp_noise' needs the config (privacy.*)")
        self.spec = privacy_spec(cfg)

    def __call__(self, update_sum: torch.Tensor, info: RoundInfo) -> Dict[str, float]:
        # Drawn on the CPU: the same numbers on every rank and every device.
        noise = torch.randn(update_sum.shape, generator=info.generator(), dtype=torch.float32)
        update_sum.add_(noise.to(update_sum.device), alpha=self.spec.noise_std)
        return {"epsilon": self.spec.epsilon(info.global_round + 1), "dp_delta": self.spec.delta,
                "dp_noise_multiplier": self.spec.noise_multiplier,
                "dp_clip_norm": self.spec.clip_norm}
