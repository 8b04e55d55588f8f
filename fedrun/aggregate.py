"""Pure aggregation math and the per-round flat buffer (tensors in, tensors out).

The buffer that crosses the network once per round is laid out as

    [ sum_c n_c * (w_c - w)  (P floats) | sum_c n_c (1) | per-slot stats (S * 4) | per-rank (W) ]

where the per-slot stats are (loss * n, n, samples, rejected) of each sampled client, written by
the rank that trained it and zero elsewhere, and the per-rank block holds each rank's local
compute time. A client update that is not finite never enters the sum: its slot only records
that it was rejected (one NaN would otherwise poison the global model of every rank).
Summing the buffer over ranks yields the weighted update and the statistics in ONE collective
(pfl-research's WeightedStatistics idea with the metrics riding along).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

BYTES_PER_FLOAT = 4  # fp32: what one federated parameter costs on the wire
STATS_PER_CLIENT = 4  # weighted loss, weight, samples processed, rejected (non-finite update)


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


@dataclass
class RoundResult:
    """The reduced buffer, decoded."""

    update_sum: torch.Tensor  # sum n_c delta_c: a view of the buffer, valid until it is reused
    total_weight: float
    client_loss: Dict[int, float]  # sampled client id -> mean local loss
    client_weight: Dict[int, float]
    client_samples: Dict[int, int]
    rank_compute_s: List[float]
    rejected: List[int] = field(default_factory=list)  # clients whose update was not finite

    @property
    def mean_update(self) -> torch.Tensor:
        """sum n_c delta_c / sum n_c (zeros when no weight arrived), as a new tensor. The round
        loop does not need it: the server step folds the division into its own pass."""
        if self.total_weight <= 0:
            return torch.zeros_like(self.update_sum)
        return self.update_sum / self.total_weight


class RoundBuffer:
    """One rank's contribution to a round: weighted update sum and stats, in one flat tensor."""

    def __init__(self, num_params: int, cohort: Sequence[int], world_size: int,
                 device: torch.device | str = "cpu", reuse: Optional["RoundBuffer"] = None):
        """``reuse``: last round's buffer, whose storage this one takes over (and zeroes) when the
        sizes match. A fresh multi-megabyte tensor every round costs page faults on every touch,
        more than the all-reduce of the same bytes on CPU (docs/benchmarks). ``reuse`` and the
        results it decoded must not be used afterwards."""
        self.num_params = num_params
        self.cohort = list(cohort)
        self.world_size = world_size
        self._slot = {client: i for i, client in enumerate(self.cohort)}
        size = num_params + 1 + STATS_PER_CLIENT * len(self.cohort) + world_size
        if (reuse is not None and reuse.buffer.numel() == size
                and reuse.buffer.device == torch.device(device)):
            self.buffer = reuse.buffer.zero_()
            self._scratch = reuse._scratch
        else:
            self.buffer = torch.zeros(size, dtype=torch.float32, device=device)
            self._scratch: torch.Tensor | None = None
        self._update_is_zero = True

    def _stats_at(self, client: int) -> int:
        return self.num_params + 1 + STATS_PER_CLIENT * self._slot[client]

    def _scratch_like(self, vector: torch.Tensor) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty_like(vector)
        return self._scratch

    def add_client(self, client: int, local: torch.Tensor, global_: torch.Tensor, weight: float,
                   loss: float, samples: int) -> bool:
        """Add weight * (local - global) and the client's stats to the buffer, in place.

        Returns False, adding nothing but the rejection and the samples processed, when the update
        or the loss holds a NaN or an infinity."""
        # The difference is taken before scaling (n * w_c - n * w would cancel catastrophically
        # in fp32), and n * delta is rounded before it is added: a fused multiply-add here would
        # round differently from the all-reduce's plain sums, and results would then depend on
        # which clients share a rank. The first client of a round writes straight into the
        # (zero) buffer -- 0 + x == x exactly -- saving a pass; later ones go through one
        # scratch vector, reused across clients and rounds.
        first = self._update_is_zero
        update = self.buffer[: self.num_params]
        target = update if first else self._scratch_like(global_)
        torch.sub(local, global_, out=target)
        at = self._stats_at(client)
        self.buffer[at + 2] += samples
        # One reduction instead of torch.isfinite(...).all(), which allocates P booleans: a NaN
        # or an infinity anywhere makes the sum non-finite (so would an overflow of the sum past
        # 3e38, which no sane update reaches).
        if not (math.isfinite(loss) and math.isfinite(float(target.sum()))):
            if first:
                update.zero_()
            self.buffer[at + 3] += 1
            return False
        target.mul_(weight)
        if first:
            self._update_is_zero = False
        else:
            update.add_(target)
        self.buffer[self.num_params] += weight
        self.buffer[at] += loss * weight
        self.buffer[at + 1] += weight
        return True

    def set_compute_time(self, rank: int, seconds: float) -> None:
        self.buffer[-self.world_size + rank] = seconds

    def decode(self) -> RoundResult:
        """Interpret the (already reduced) buffer."""
        stats = self.buffer[self.num_params:].double().cpu()
        total_weight = float(stats[0])
        losses, weights, samples, rejected = {}, {}, {}, []
        for client, slot in self._slot.items():
            loss_w, weight, seen, bad = stats[1 + STATS_PER_CLIENT * slot: 1 + STATS_PER_CLIENT * (slot + 1)].tolist()
            weights[client] = weight
            samples[client] = int(round(seen))
            losses[client] = loss_w / weight if weight > 0 else float("nan")
            if bad > 0:
                rejected.append(client)
        return RoundResult(self.buffer[: self.num_params], total_weight, losses, weights, samples,
                           stats[-self.world_size:].tolist(), sorted(rejected))


def weighted_loss(result: RoundResult) -> float:
    """Train loss of the round: the clients' mean losses weighted like their updates."""
    total = sum(result.client_weight.values())
    if total <= 0:
        return float("nan")
    return sum(result.client_loss[c] * w for c, w in result.client_weight.items() if w > 0) / total
