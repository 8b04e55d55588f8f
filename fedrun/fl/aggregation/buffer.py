"""The round's flat buffer: one rank's contribution to the round, reduced by ONE all-reduce.

    [ sum_c n_c * (w_c - w) (P) | segments of the client algorithm | sum_c n_c (1)
      | scalar slots (N) | per-slot stats (S * 4) | per-rank (W) ]

where the scalar slots hold numbers the update transforms send per client, summed unweighted
over the accepted clients (``UpdateTransform.scalar_slots``: adaptive clipping's count of
unclipped clients; none unless a transform asks, so the buffer is unchanged otherwise), the
per-slot stats are (loss * n, n, samples, rejected-by) of each sampled client, written
by the rank that trained it and zero elsewhere, and the per-rank block holds each rank's local
compute time. Between ``w_c - w`` and the weighted sum each update passes the uplink codec
(encoded, then decoded as the server would) and the configured *update transforms* (``fedrun.fl.aggregation.transforms``); a rejected update never enters the
sum, its slot records which transform refused it. Summing the buffer over ranks yields the
weighted update, the algorithm's segments and the statistics in ONE collective (pfl-research's
WeightedStatistics idea with the metrics riding along). In exact mode (``aggregation.exact``)
every term is rounded to its segment's grid (``fedrun.fl.aggregation.exact``) and the buffer
holds float64 integers, so the sum does not depend on how clients are grouped into ranks; a
client any of whose parts leaves its grid's range is rejected whole ('exact_range' or
'exact_range:<segment>'). Pure tensor code: no process group here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fedrun.fl.aggregation.exact import EXACT_BLOCK, EXACT_RANGE, ExactGrid, _blocks
from fedrun.fl.aggregation.transforms import UpdateInfo, UpdateTransform
from fedrun.rng import derived_generator

BYTES_PER_FLOAT = 4  # fp32: what one federated parameter costs on the wire
STATS_PER_CLIENT = 4  # weighted loss, weight, samples processed, rejected-by (transform index + 1)
_ROUNDING_STREAM = 0x5A0D  # exact mode's stochastic rounding: (seed, round, client, tag, segment)


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




# ---------------------------------------------------------------- exact sums


# ---------------------------------------------------------------- the round buffer

@dataclass
class Segment:
    """An extra part of the round buffer that a client algorithm (or the task) fills: summed
    unweighted, or multiplied by the client's weight like the update (``weighted``)."""

    name: str
    numel: int
    reference: Optional[torch.Tensor] = None  # exact mode: magnitude reference (see ExactGrid)
    weighted: bool = False  # add weight * values (exact mode: the grid's integers times weight)


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
    scalars: Dict[str, float] = field(default_factory=dict)  # summed scalar slots

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
                 transforms: Sequence[UpdateTransform] = (), scalars: Sequence[str] = ()):
        """``reuse``: last round's buffer, whose storage this one takes over (and zeroes) when the
        sizes match. A fresh multi-megabyte tensor every round costs page faults on every touch,
        more than the all-reduce of the same bytes on CPU (docs/benchmarks). ``reuse`` and the
        results it decoded must not be used afterwards. ``exact``: segment name ('update' for the
        weighted update) -> its grid this round. ``transforms``: the update transforms, applied
        in order to every update (the same list on every rank: a rejection is recorded by its
        position). ``scalars``: names of the scalar slots (what the transforms write into
        ``UpdateInfo.scalars``; sums of small numbers such as +-1/2, exact in fp32 and float64)."""
        self.num_params = num_params
        self.cohort = list(cohort)
        self.world_size = world_size
        self.exact = exact
        self.transforms = list(transforms)
        self._slot = {client: i for i, client in enumerate(self.cohort)}
        # Each segment starts at an offset; in exact mode it is padded to whole blocks.
        pad = (lambda n: _blocks(n) * EXACT_BLOCK) if exact else (lambda n: n)
        self._spans: Dict[str, tuple] = {}
        self._weighted = {s.name for s in segments if s.weighted}
        offset = 0
        for name, numel in [("update", num_params)] + [(s.name, s.numel) for s in segments]:
            self._spans[name] = (offset, numel, pad(numel))
            offset += pad(numel)
        self._stats = offset
        self._scalars = {name: offset + 1 + i for i, name in enumerate(scalars)}
        self._clients = offset + 1 + len(self._scalars)  # the first client's stats
        size = self._clients + STATS_PER_CLIENT * len(self.cohort) + world_size
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
        return self._clients + STATS_PER_CLIENT * self._slot[client]

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
                   segments: Optional[Dict[str, torch.Tensor]] = None,
                   uplink: Optional[Callable[[torch.Tensor], None]] = None) -> bool:
        """Add weight * transforms(uplink(local - global)), the client's ``segments`` and its
        stats to the buffer, in place. ``uplink`` replaces the update, in place, by what the
        server decodes from the client's message (``fedrun.fl.aggregation.codecs``). Returns
        False, adding nothing but the rejection and the samples processed, when a transform
        rejects the update (or it leaves the exact grid's range)."""
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
        if uplink is not None:
            uplink(delta)
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
                self.segment(name).add_(values, alpha=weight if name in self._weighted else 1)
        else:  # integers below 2**53: the float64 sums are exact
            for name, (start, _, padded) in self._spans.items():
                if name == "update":
                    self.buffer[start: start + padded].add_(self._scratch[:padded], alpha=weight)
                elif name in segments:
                    self.buffer[start: start + padded].add_(
                        self._work[name], alpha=weight if name in self._weighted else 1)
        self._update_is_zero = False
        for name, at_slot in self._scalars.items():
            self.buffer[at_slot] += info.scalars.get(name, 0.0)
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
        scalars = {name: float(stats[at - self._stats]) for name, at in self._scalars.items()}
        first = self._clients - self._stats
        losses, weights, samples, rejected_by = {}, {}, {}, {}
        reasons = self._reasons
        for client, slot in self._slot.items():
            row = stats[first + STATS_PER_CLIENT * slot: first + STATS_PER_CLIENT * (slot + 1)].tolist()
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
                           segments, scalars)

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

