"""DP-FedAvg's two transforms: 'dp_clip' (the last update transform: each client's whole update
scaled to L2 norm <= the clip norm, exactly) and 'dp_noise' (a server transform: Gaussian
noise of std sigma * clip_norm added once to the round's sum, from the (seed, round) stream, so
every rank adds the same noise without a broadcast). The accounting is in ``accountant``.

The clip norm is privacy.clip_norm, or with adaptive clipping (privacy.clip_quantile,
``adaptive``) a value both transforms share (``share_clip_norm``): 'dp_clip' also writes each
client's centred bit b_i - 1/2 into the round buffer's slot ``UNCLIPPED``, and 'dp_noise' noises
the reduced count, scales the update's noise by z_Delta * C and moves C for the next round."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from fedrun.errors import ConfigError
from fedrun.fl.aggregation.transforms import RoundInfo, ServerTransform, UpdateInfo, UpdateTransform
from fedrun.fl.privacy.accountant import privacy_spec
from fedrun.fl.privacy.adaptive import UNCLIPPED, ClipNorm, centred_bit
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
    """Step 2: the client's update scaled to L2 norm <= the clip norm (never rejected). With
    exact aggregation the bound is lowered by the grid's rounding bound, so that the rounded
    term that enters the sum is within the clip norm too. With adaptive clipping it also sends
    b_i - 1/2 (b_i = 1 when the norm before clipping is within the clip norm) in the buffer's
    scalar slot ``UNCLIPPED``."""

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        super().__init__(cfg, params)
        if cfg is None:
            raise ConfigError("update transform 'dp_clip' needs the config (privacy.clip_norm)")
        self.clip = ClipNorm(cfg.privacy.clip_norm)
        self.adaptive = cfg.privacy.clip_quantile is not None
        self.scalar_slots = (UNCLIPPED,) if self.adaptive else ()

    @property
    def clip_norm(self) -> float:
        return self.clip.value

    def __call__(self, delta: torch.Tensor, info: UpdateInfo) -> Optional[str]:
        clip_norm = self.clip.value
        bound = clip_norm - info.rounding_bound
        if bound <= 0.5 * clip_norm:
            raise ConfigError(f"config key 'privacy.clip_norm': {clip_norm} is below twice the "
                              f"exact grid's rounding error {info.rounding_bound:.3g}; raise it or "
                              "set aggregation.exact=false")
        norm = clip_to_norm_(delta, bound)
        if self.adaptive:
            info.scalars[UNCLIPPED] = centred_bit(norm, clip_norm)
        return None


@SERVER_TRANSFORMS.register("dp_noise")
class DpNoise(ServerTransform):
    """Step 4: N(0, (sigma * clip_norm)^2) per coordinate added to the reduced sum, from the
    round's (seed, round) stream; reports the guarantee after this round (the configured
    accountant's epsilon). Adaptive clipping: the update's multiplier is z_Delta, then
    N(0, sigma_b^2) from the same stream noises the count of unclipped clients and the clip norm
    takes its step for the next round."""

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        super().__init__(cfg, params)
        if cfg is None:
            raise ConfigError("server transform 'dp_noise' needs the config (privacy.*)")
        self.spec = privacy_spec(cfg)
        self.clip = ClipNorm(self.spec.clip_norm)

    def __call__(self, update_sum: torch.Tensor, info: RoundInfo) -> Dict[str, float]:
        spec, clip_norm = self.spec, self.clip.value
        generator = info.generator()
        # Drawn on the CPU: the same numbers on every rank and every device.
        noise = torch.randn(update_sum.shape, generator=generator, dtype=torch.float32)
        update_sum.add_(noise.to(update_sum.device), alpha=spec.update_noise_multiplier * clip_norm)
        metrics = {"epsilon": spec.epsilon(info.global_round + 1), "dp_delta": spec.delta,
                   "dp_noise_multiplier": spec.noise_multiplier, "dp_clip_norm": clip_norm}
        if spec.adaptive is not None:
            count_noise = float(torch.randn((), generator=generator, dtype=torch.float64))
            noised = info.scalars.get(UNCLIPPED, 0.0) + spec.adaptive.count_noise_std * count_noise
            fraction, self.clip.value = spec.adaptive.step(clip_norm, noised, spec.clients_per_round)
            metrics.update(dp_update_noise_multiplier=spec.update_noise_multiplier,
                           dp_unclipped_fraction=fraction)
        return metrics


def share_clip_norm(update_transforms: List[Any], server_transforms: List[Any]) -> Optional[ClipNorm]:
    """Make 'dp_clip' clip with the norm 'dp_noise' holds (and moves, under adaptive clipping);
    returns it (None without DP). Call once, after building both lists."""
    noise = [t for t in server_transforms if isinstance(t, DpNoise)]
    if not noise:
        return None
    for transform in update_transforms:
        if isinstance(transform, DpClip):
            transform.clip = noise[0].clip
    return noise[0].clip
