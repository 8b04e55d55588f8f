"""The seams around the round's sum: client-update transforms (between a client's update and the
weighted sum: the non-finite guard, DP clipping, ...) and server transforms (on the reduced sum,
before the server step: DP noise, ...), registered in ``fedrun.registry`` (UPDATE_TRANSFORMS,
SERVER_TRANSFORMS). A transform's randomness comes from the generator its info hands out, seeded
by (seed, round, client) or (seed, round): every rank draws the same numbers without
communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from fedrun.registry import SERVER_TRANSFORMS, UPDATE_TRANSFORMS
from fedrun.rng import derived_generator

if TYPE_CHECKING:
    from fedrun.config import Config


_UPDATE_STREAM = 0x7F0A  # update transforms' random stream: (seed, round, client, tag)


_SERVER_STREAM = 0x5E4F  # server transforms' random stream: (seed, round, tag)


@dataclass
class UpdateInfo:
    """What an update transform knows about the update in front of it."""

    client: int
    global_round: int
    seed: int
    weight: float
    loss: float
    #: L2 bound of what the exact grid's rounding can add to the update after the transforms (0
    #: with fp32 sums): a norm bound (DP clipping) must leave room for it.
    rounding_bound: float = 0.0
    #: what the transforms send in the round buffer's scalar slots (their ``scalar_slots``),
    #: summed unweighted over the accepted clients (adaptive clipping's unclipped bit)
    scalars: Dict[str, float] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """The transform's random stream, seeded by (seed, round, client): the same whichever
        rank trains the client."""
        return derived_generator(self.seed, self.global_round, self.client, _UPDATE_STREAM)


@dataclass
class RoundInfo:
    """What a server transform knows about the reduced round."""

    global_round: int
    seed: int
    total_weight: float
    accepted: int  # clients whose update entered the sum
    scalars: Dict[str, float] = field(default_factory=dict)  # the buffer's reduced scalar slots

    def generator(self) -> torch.Generator:
        """The transform's random stream, seeded by (seed, round): every rank draws the same
        numbers, so every rank applies the same transform without a broadcast."""
        return derived_generator(self.seed, self.global_round, _SERVER_STREAM)


class UpdateTransform:
    """Acts on one client's update ``delta = local - global`` (fp32, in place) before the
    weighted sum; returns None to accept it or a short reason to reject it. A transform with
    parameters declares a ``Params`` dataclass; they are set in the config under
    ``aggregation.<its name>`` and handed over as ``params``. A transform that sends a number
    per client besides the update names its slots in ``scalar_slots`` and writes
    ``info.scalars[slot]``; the round buffer sums them in its one all-reduce."""

    scalar_slots: Tuple[str, ...] = ()

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        self.cfg = cfg
        self.params = params

    def __call__(self, delta: torch.Tensor, info: UpdateInfo) -> Optional[str]:
        raise NotImplementedError


class ServerTransform:
    """Acts on the reduced sum of weighted updates (in place) before the server step; returns
    metrics for the round's record."""

    def __init__(self, cfg: Optional["Config"] = None, params: Any = None):
        self.cfg = cfg
        self.params = params  # its Params from aggregation.<its name>, as for update transforms

    def __call__(self, update_sum: torch.Tensor, info: RoundInfo) -> Dict[str, float]:
        raise NotImplementedError


@UPDATE_TRANSFORMS.register("nonfinite_guard")
class NonFiniteGuard(UpdateTransform):
    """Rejects an update (or a loss) holding a NaN or an infinity."""

    def __call__(self, delta: torch.Tensor, info: UpdateInfo) -> Optional[str]:
        # One reduction instead of torch.isfinite(...).all(), which allocates P booleans: a NaN or
        # an infinity anywhere makes the sum non-finite (so would an overflow of the sum past
        # 3e38, which no sane update reaches).
        if math.isfinite(info.loss) and math.isfinite(float(delta.sum())):
            return None
        return "nonfinite"


def _build(registry, cfg: "Config", names: List[str]) -> list:
    """Each named transform, with its parameters from ``aggregation.<name>`` if it has any."""
    return [registry.get(name)(cfg, registry.build_params(name, getattr(cfg.aggregation, name, None)))
            for name in names]


def build_update_transforms(cfg: "Config") -> List[UpdateTransform]:
    return _build(UPDATE_TRANSFORMS, cfg, cfg.aggregation.update_transforms)


def build_server_transforms(cfg: "Config") -> List[ServerTransform]:
    return _build(SERVER_TRANSFORMS, cfg, cfg.aggregation.server_transforms)
