"""Pure aggregation math, the client-update and server transforms, and the per-round flat buffer
(tensors in, tensors out).

The buffer that crosses the network once per round is laid out as

    [ sum_c n_c * (w_c - w) (P) | segments of the client algorithm | sum_c n_c (1)
      | per-slot stats (S * 4) | per-rank (W) ]

where the per-slot stats are (loss * n, n, samples, rejected-by) of each sampled client, written
by the rank that trained it and zero elsewhere, and the per-rank block holds each rank's local
compute time. Between ``w_c - w`` and the weighted sum each update passes the configured
*update transforms* (``aggregation.update_transforms``; the first, ``nonfinite_guard``, rejects
an update holding a NaN or an infinity, which would otherwise poison every rank's model); a
rejected update never enters the sum, its slot records which transform refused it. Summing the
buffer over ranks yields the weighted update, the algorithm's segments and the statistics in ONE
collective (pfl-research's WeightedStatistics idea with the metrics riding along). The *server
transforms* (``aggregation.server_transforms``) then act on the reduced sum.

Exact sums (``aggregation.exact``, the default). Float addition is not associative, so a plain
fp32 sum depends on which clients share a rank, and Adam turns those 1-ulp differences into
visibly different models. In exact mode every term is rounded to a fixed-point grid first and the
buffer holds float64 integers: integer sums below 2**53 are exact in float64, in any order and
grouping, so 1, 2, 3 or 4 processes produce the same bits. The grid is shared by every rank
without communicating: per block of ``EXACT_BLOCK`` coordinates it is 2**(e_b - F), where 2**e_b
bounds the largest magnitude of a *reference* vector every rank holds (the global weights for the
update; at least 1/64 of the reference's overall largest magnitude) and F leaves room for the
round's total weight and ``EXACT_HEADROOM_BITS`` bits of headroom. So an update coordinate is
represented to a grid step of 2**-F times the bound of its block's largest weight (F = 36 for the
default job: ~1.5e-11 of it), not relative to the coordinate itself: in a block whose largest
weight is 1, an update of 1e-12 is below one grid step. ``aggregation.rounding`` says what happens
to it: 'stochastic' (the default) rounds up with probability equal to the fraction of a step,
from the (seed, round, client) stream, so the rounded term is unbiased (to 2**-24 of a step) and
the sum stays independent of the world size; 'nearest' rounds it to zero, every round. A term
whose block holds a value at or beyond 2**6 = 64 times that block's bound (a diverging client),
in the update or in any of the algorithm's segments, gets the client rejected as 'exact_range'
('exact_range:<segment>') instead of overflowing. Weights must be integers (sample counts or 1).
Cost: twice the bytes of the all-reduce and a few passes per client; measured in docs/benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

from fedrun.registry import Registry
from fedrun.rng import derived_generator

if TYPE_CHECKING:
    from fedrun.config import Config

BYTES_PER_FLOAT = 4  # fp32: what one federated parameter costs on the wire
STATS_PER_CLIENT = 4  # weighted loss, weight, samples processed, rejected-by (transform index + 1)
EXACT_BLOCK = 1024  # coordinates sharing one fixed-point grid in exact mode
EXACT_HEADROOM_BITS = 6  # exact mode: terms up to 2**6 x the block's reference bound fit
EXACT_FLOOR_BITS = 6  # a block's bound is at least 2**-6 x the reference's overall maximum
EXACT_RANGE = "exact_range"  # rejection reason of a term beyond the exact grid's range
_UPDATE_STREAM = 0x7F0A  # update transforms' random stream: (seed, round, client, tag)
_ROUNDING_STREAM = 0x5A0D  # exact mode's stochastic rounding: (seed, round, client, tag, segment)
_SERVER_STREAM = 0x5E4F  # server transforms' random stream: (seed, round, tag)


def weighted_mean(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Reference FedAvg average sum_c n_c u_c / sum_c n_c, for tests and one-process checks."""
    if len(updates) != len(weights) or not updates:
        raise ValueError("need as many weights as updates, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to zero")
    out = torch.zeros_like(updates[0], dtype=torch.float64)
    for update, weight in zip(updates, weights):
        out += float(weight) * update.double()
    return (out / total).to(updates[0].dtype)


def client_weight(num_samples: int, weighting: str) -> float:
    """n_c in FedAvg: the client's data size ('samples') or 1 ('uniform')."""
    if weighting == "samples":
        return float(num_samples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"unknown weighting '{weighting}'")


# ---------------------------------------------------------------- transforms (the seams)

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

    def generator(self) -> torch.Generator:
        """The transform's random stream, seeded by (seed, round): every rank draws the same
        numbers, so every rank applies the same transform without a broadcast."""
        return derived_generator(self.seed, self.global_round, _SERVER_STREAM)


class UpdateTransform:
    """Acts on one client's update ``delta = local - global`` (fp32, in place) before the
    weighted sum; returns None to accept it or a short reason to reject it."""

    def __init__(self, cfg: Optional["Config"] = None):
        self.cfg = cfg

    def __call__(self, delta: torch.Tensor, info: UpdateInfo) -> Optional[str]:
        raise NotImplementedError


class ServerTransform:
    """Acts on the reduced sum of weighted updates (in place) before the server step; returns
    metrics for the round's record."""

    def __init__(self, cfg: Optional["Config"] = None):
        self.cfg = cfg

    def __call__(self, update_sum: torch.Tensor, info: RoundInfo) -> Dict[str, float]:
        raise NotImplementedError


UPDATE_TRANSFORMS: Registry = Registry("update transform", "aggregation.update_transforms")
SERVER_TRANSFORMS: Registry = Registry("server transform", "aggregation.server_transforms")


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


def build_update_transforms(cfg: "Config") -> List[UpdateTransform]:
    return [UPDATE_TRANSFORMS.get(n)(cfg) for n in cfg.aggregation.update_transforms]


def build_server_transforms(cfg: "Config") -> List[ServerTransform]:
    return [SERVER_TRANSFORMS.get(n)(cfg) for n in cfg.aggregation.server_transforms]


# ---------------------------------------------------------------- exact sums

def _blocks(numel: int) -> int:
    return -(-numel // EXACT_BLOCK)


class ExactGrid:
    """The fixed-point grid of one buffer segment for one round (identical on every rank).

    ``reference``: a vector every rank holds (the global weights), or None for a segment of
    magnitude ~1; ``weight_bound``: an upper bound of the sum of the weights of the round's terms.
    """

    def __init__(self, numel: int, reference: Optional[torch.Tensor], weight_bound: float,
                 device: torch.device | str = "cpu", rounding: str = "stochastic"):
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"unknown rounding '{rounding}'")
        self.rounding = rounding
        self.numel, self.blocks = numel, _blocks(numel)
        bound_bits = max(0, math.ceil(math.log2(max(weight_bound, 1.0))))
        self.fraction_bits = 53 - bound_bits - EXACT_HEADROOM_BITS
        if self.fraction_bits < 8:
            raise ValueError(f"aggregation.exact: the round's total weight {weight_bound:g} leaves "
                             "too few bits for exact sums; use uniform weighting or exact=false")
        self.limit = 2.0 ** (self.fraction_bits + EXACT_HEADROOM_BITS)  # |q| must stay below
        exponents = self._block_exponents(reference, device)
        # inverse grid 2**(F - e_b) and grid 2**(e_b - F), one per block; powers of two, so
        # scaling is exact in fp32 and float64.
        self.inverse = torch.ldexp(torch.ones(self.blocks, 1, device=device),
                                   (self.fraction_bits - exponents).view(-1, 1))
        self.grid = torch.ldexp(torch.ones(self.blocks, 1, dtype=torch.float64, device=device),
                                (exponents - self.fraction_bits).view(-1, 1))
        # Rounding moves a coordinate by less than one grid step (stochastic) or at most half of
        # one (nearest): an L2 bound of the rounding error of a whole vector.
        lengths = torch.full((self.blocks,), float(EXACT_BLOCK), dtype=torch.float64)
        lengths[-1] = numel - (self.blocks - 1) * EXACT_BLOCK
        step = 1.0 if rounding == "stochastic" else 0.5
        self.error_bound = step * math.sqrt(float((lengths * self.grid.view(-1).cpu() ** 2).sum()))

    def _block_exponents(self, reference: Optional[torch.Tensor], device) -> torch.Tensor:
        if reference is None:
            return torch.ones(self.blocks, dtype=torch.int32, device=device)  # bound 2**1 > 1
        magnitude = reference.detach().abs()
        full = self.numel // EXACT_BLOCK * EXACT_BLOCK
        maxima = [magnitude[:full].view(-1, EXACT_BLOCK).amax(dim=1)] if full else []
        if full < self.numel:
            maxima.append(magnitude[full:].amax().view(1))
        block_max = torch.cat(maxima).float()
        overall = float(block_max.max())
        floor = overall * 2.0 ** -EXACT_FLOOR_BITS if overall > 0 else 1.0
        _, exponents = torch.frexp(block_max.clamp(min=floor))  # x < 2**e
        return exponents.to(torch.int32).clamp(-60, 60)  # keeps 2**(F - e) a finite fp32

    def quantize_(self, padded: torch.Tensor, generator: Optional[torch.Generator] = None,
                  scratch: Optional[torch.Tensor] = None) -> bool:
        """Round ``padded`` (fp32, blocks * EXACT_BLOCK long, zero past numel) to the grid, in
        place, as integers in grid units; False if a value is out of range. With ``generator``
        the rounding is stochastic: x -> floor(x) + 1 with probability frac(x) = x - floor(x),
        so E[rounded] = x (up to the 2**-24 resolution of the uniform draws; frac(x) is exact
        in fp32 except for negative x within one step of 0, where it is within 2**-25); without,
        round-half-even. ``scratch``: fp32 work space of 2 * len(padded) (allocated if None)."""
        view = padded.view(self.blocks, EXACT_BLOCK)
        view.mul_(self.inverse)  # exact scaling (powers of two); a value above 2**24 is integral
        if generator is None:
            padded.round_()
        else:
            n = padded.numel()
            if scratch is None or scratch.numel() < 2 * n:
                scratch = torch.empty(2 * n, dtype=torch.float32, device=padded.device)
            floor, draws = scratch[:n], scratch[n: 2 * n]
            torch.floor(padded, out=floor)
            fraction = padded.sub_(floor)  # in [0, 1)
            torch.rand(n, generator=generator, out=draws)
            draws.lt_(fraction)  # 1.0 where the draw falls below the fraction: round up
            torch.add(floor, draws, out=padded)
        low, high = torch.aminmax(padded)
        return max(-float(low), float(high)) < self.limit

    def decode(self, integers: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Grid units (float64, padded) back to values: ``out`` (fp32, padded) holds them."""
        torch.mul(integers.view(self.blocks, EXACT_BLOCK), self.grid,
                  out=out.view(self.blocks, EXACT_BLOCK))
        return out[: self.numel]


# ---------------------------------------------------------------- the round buffer

@dataclass
class Segment:
    """An extra part of the round buffer that a client algorithm fills (summed unweighted)."""

    name: str
    numel: int
    reference: Optional[torch.Tensor] = None  # exact mode: magnitude reference (see ExactGrid)


@dataclass
class RoundResult:
    """The reduced buffer, decoded."""

    update_sum: torch.Tensor  # sum n_c delta_c: valid until the buffer is reused
    total_weight: float
    client_loss: Dict[int, float]  # sampled client id -> mean local loss
    client_weight: Dict[int, float]
    client_samples: Dict[int, int]
    rank_compute_s: List[float]
    rejected: List[int] = field(default_factory=list)  # clients whose update was refused
    rejected_by: Dict[int, str] = field(default_factory=dict)  # client -> transform or reason
    segments: Dict[str, torch.Tensor] = field(default_factory=dict)  # summed algorithm segments

    @property
    def mean_update(self) -> torch.Tensor:
        """sum n_c delta_c / sum n_c (zeros when no weight arrived), as a new tensor. The round
        loop does not need it: the server step folds the division into its own pass."""
        if self.total_weight <= 0:
            return torch.zeros_like(self.update_sum)
        return self.update_sum / self.total_weight


class RoundBuffer:
    """One rank's contribution to a round: weighted update sum, segments and stats, in one flat
    tensor (fp32, or float64 fixed-point integers when ``exact`` grids are given)."""

    def __init__(self, num_params: int, cohort: Sequence[int], world_size: int,
                 device: torch.device | str = "cpu", reuse: Optional["RoundBuffer"] = None, *,
                 segments: Sequence[Segment] = (), exact: Optional[Dict[str, ExactGrid]] = None,
                 transforms: Sequence[UpdateTransform] = ()):
        """``reuse``: last round's buffer, whose storage this one takes over (and zeroes) when the
        sizes match. A fresh multi-megabyte tensor every round costs page faults on every touch,
        more than the all-reduce of the same bytes on CPU (docs/benchmarks). ``reuse`` and the
        results it decoded must not be used afterwards. ``exact``: segment name ('update' for the
        weighted update) -> its grid this round. ``transforms``: the update transforms, applied
        in order to every update (the same list on every rank: a rejection is recorded by its
        position)."""
        self.num_params = num_params
        self.cohort = list(cohort)
        self.world_size = world_size
        self.exact = exact
        self.transforms = list(transforms)
        self._slot = {client: i for i, client in enumerate(self.cohort)}
        # Each segment starts at an offset; in exact mode it is padded to whole blocks.
        pad = (lambda n: _blocks(n) * EXACT_BLOCK) if exact else (lambda n: n)
        self._spans: Dict[str, tuple] = {}
        offset = 0
        for name, numel in [("update", num_params)] + [(s.name, s.numel) for s in segments]:
            self._spans[name] = (offset, numel, pad(numel))
            offset += pad(numel)
        self._stats = offset
        size = offset + 1 + STATS_PER_CLIENT * len(self.cohort) + world_size
        dtype = torch.float64 if exact else torch.float32
        if (reuse is not None and reuse.buffer.numel() == size and reuse.buffer.dtype == dtype
                and reuse.buffer.device == torch.device(device)):
            self.buffer = reuse.buffer.zero_()
            self._scratch, self._work = reuse._scratch, reuse._work
        else:
            self.buffer = torch.zeros(size, dtype=dtype, device=device)
            self._scratch, self._work = None, {}
        self._update_is_zero = True
        # rejection codes (stats slot 3, position + 1): the transforms, then the exact grid's
        # range for the update and for each segment
        self._reasons = ([getattr(t, "name", type(t).__name__) for t in self.transforms]
                         + [EXACT_RANGE] + [f"{EXACT_RANGE}:{name}" for name in self._spans
                                            if name != "update"])

    # ------------------------------------------------------------ helpers
    def _stats_at(self, client: int) -> int:
        return self._stats + 1 + STATS_PER_CLIENT * self._slot[client]

    def segment(self, name: str) -> torch.Tensor:
        start, numel, _ = self._spans[name]
        return self.buffer[start: start + numel]

    def _scratch_for(self, padded: int, device) -> torch.Tensor:
        """One fp32 work vector (padded length), reused across clients and rounds; zero past the
        values written into it (exact mode's padding must stay zero)."""
        if self._scratch is None or self._scratch.numel() < padded:
            self._scratch = torch.zeros(padded, dtype=torch.float32, device=device)
        return self._scratch[:padded]

    def _work_for(self, name: str, numel: int, device) -> torch.Tensor:
        """A segment's own fp32 work vector (reused): its integers wait there until every part
        of the client's contribution is known to fit the grid."""
        work = self._work.get(name)
        if work is None or work.numel() != numel or work.device != torch.device(device):
            work = self._work[name] = torch.zeros(numel, dtype=torch.float32, device=device)
        return work

    def _quantize_exact(self, delta: torch.Tensor, segments: Dict[str, torch.Tensor],
                        info: UpdateInfo) -> Optional[str]:
        """Round the update (already in the scratch vector) and each segment to their grids, in
        their work vectors; the rejection reason if any part leaves its grid's range (then
        nothing of the client is added)."""
        rounding_space = self._work_for("rounding", 2 * max(p for _, _, p in self._spans.values()),
                                        delta.device)
        for index, name in enumerate(self._spans):
            if name != "update" and name not in segments:
                continue
            _, numel, padded = self._spans[name]
            if name == "update":
                work = self._scratch_for(padded, delta.device)  # delta lives there already
            else:
                work = self._work_for(name, padded, delta.device)
                work[:numel].copy_(segments[name])
            grid = self.exact[name]
            generator = (derived_generator(info.seed, info.global_round, info.client,
                                           _ROUNDING_STREAM, index, device=delta.device)
                         if grid.rounding == "stochastic" else None)
            if not grid.quantize_(work, generator, rounding_space):
                return EXACT_RANGE if name == "update" else f"{EXACT_RANGE}:{name}"
        return None

    # ------------------------------------------------------------ adding clients
    def add_client(self, client: int, local: torch.Tensor, global_: torch.Tensor, weight: float,
                   loss: float, samples: int, *, info: Optional[UpdateInfo] = None,
                   segments: Optional[Dict[str, torch.Tensor]] = None) -> bool:
        """Add weight * transforms(local - global), the client's ``segments`` and its stats to
        the buffer, in place. Returns False, adding nothing but the rejection and the samples
        processed, when a transform rejects the update (or it leaves the exact grid's range)."""
        at = self._stats_at(client)
        self.buffer[at + 2] += samples
        info = info or UpdateInfo(client, 0, 0, weight, loss)
        segments = segments or {}
        if self.exact is not None:
            info.rounding_bound = self.exact["update"].error_bound
        # The difference is taken before scaling (n * w_c - n * w would cancel catastrophically
        # in fp32). fp32 mode: n * delta is rounded before it is added -- a fused multiply-add
        # would round differently from the all-reduce's plain sums -- and the first client of a
        # round writes straight into the (zero) buffer (0 + x == x exactly), saving a pass.
        first_in_place = self.exact is None and self._update_is_zero
        if first_in_place:
            delta = self.buffer[: self.num_params]
        elif self.exact is not None:
            delta = self._scratch_for(self._spans["update"][2], global_.device)[: self.num_params]
        else:
            delta = self._scratch_for(self.num_params, global_.device)
        torch.sub(local, global_, out=delta)
        reason = None
        for index, transform in enumerate(self.transforms):
            if transform(delta, info) is not None:
                reason = self._reasons[index]  # recorded as the transform's name
                break
        if reason is None and self.exact is not None:
            if not float(weight).is_integer():
                raise ValueError(f"aggregation.exact needs integer client weights, got {weight}")
            if delta.numel() < self._spans["update"][2]:
                self._scratch_for(self._spans["update"][2], delta.device)[self.num_params:].zero_()
            reason = self._quantize_exact(delta, segments, info)
        if reason is not None:
            self.buffer[at + 3] = self._reasons.index(reason) + 1
            if first_in_place:
                delta.zero_()
            return False
        if self.exact is None:
            if first_in_place:
                delta.mul_(weight)
            else:
                self.buffer[: self.num_params].add_(delta.mul_(weight))
            for name, values in segments.items():
                self.segment(name).add_(values)
        else:  # integers below 2**53: the float64 sums are exact
            for name, (start, _, padded) in self._spans.items():
                if name == "update":
                    self.buffer[start: start + padded].add_(self._scratch[:padded], alpha=weight)
                elif name in segments:
                    self.buffer[start: start + padded].add_(self._work[name])
        self._update_is_zero = False
        self.buffer[self._stats] += weight
        self.buffer[at] += loss * weight
        self.buffer[at + 1] += weight
        return True

    def set_compute_time(self, rank: int, seconds: float) -> None:
        self.buffer[-self.world_size + rank] = seconds

    # ------------------------------------------------------------ after the all-reduce
    def decode(self) -> RoundResult:
        """Interpret the (already reduced) buffer."""
        stats = self.buffer[self._stats:].double().cpu()
        total_weight = float(stats[0])
        losses, weights, samples, rejected_by = {}, {}, {}, {}
        reasons = self._reasons
        for client, slot in self._slot.items():
            row = stats[1 + STATS_PER_CLIENT * slot: 1 + STATS_PER_CLIENT * (slot + 1)].tolist()
            loss_w, weight, seen, code = row
            weights[client] = weight
            samples[client] = int(round(seen))
            losses[client] = loss_w / weight if weight > 0 else float("nan")
            if code > 0:
                index = int(round(code)) - 1
                rejected_by[client] = reasons[index] if index < len(reasons) else f"transform {index}"
        segments = {name: self._decoded(name) for name in self._spans if name != "update"}
        return RoundResult(self._decoded("update"), total_weight, losses, weights, samples,
                           stats[-self.world_size:].tolist(), sorted(rejected_by), rejected_by,
                           segments)

    def _decoded(self, name: str) -> torch.Tensor:
        start, numel, padded = self._spans[name]
        if self.exact is None:
            return self.buffer[start: start + numel]
        # The update decodes into the scratch vector (free once the clients are added); a
        # segment gets its own tensor.
        out = (self._scratch_for(padded, self.buffer.device) if name == "update"
               else torch.empty(padded, dtype=torch.float32, device=self.buffer.device))
        return self.exact[name].decode(self.buffer[start: start + padded], out)


def weighted_loss(result: RoundResult) -> float:
    """Train loss of the round: the clients' mean losses weighted like their updates."""
    total = sum(result.client_weight.values())
    if total <= 0:
        return float("nan")
    return sum(result.client_loss[c] * w for c, w in result.client_weight.items() if w > 0) / total


# The DP-FedAvg transforms ('dp_clip', 'dp_noise') register themselves on import; imported here so
# that every registered name is known wherever the registries are (config validation).
import fedrun.privacy  # noqa: E402,F401
