"""Which clients train in a round, and which rank runs each of them (pure functions).

The cohort comes from a generator seeded by (seed, round), so every rank computes the same
cohort without a broadcast. Clients are then dealt to ranks deterministically.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def sample_cohort(num_clients: int, clients_per_round: int, seed: int, global_round: int,
                  sampling: str = "fixed") -> List[int]:
    """The sorted ids of the clients sampled in ``global_round``.

    ``sampling='fixed'``: exactly K = ``clients_per_round`` clients without replacement (all
    clients when K = C). ``'poisson'``: each client independently with probability q = K / C
    (what DP accountants assume, ``fedrun.fl.privacy``): K clients on average, possibly none; the
    draws come from one generator seeded by (seed, round), so every rank agrees."""
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must be in [1, {num_clients}]")
    if sampling == "poisson":
        rng = np.random.default_rng([seed, global_round, 0x9015])
        return np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients).tolist()
    if sampling != "fixed":
        raise ValueError(f"unknown cohort sampling '{sampling}'")
    if clients_per_round == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, global_round, 0xC0407])
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def assign_to_ranks(cohort: Sequence[int], world_size: int,
                    costs: Optional[Sequence[float]] = None) -> List[List[int]]:
    """Deal the cohort to ``world_size`` ranks, balancing the total cost (default: 1 per client).

    Longest-processing-time-first, ties broken by client id and then by the lowest rank: with
    equal costs this is round-robin, so with C = world size rank k trains client k.
    A rank may get no client (more ranks than sampled clients): it then contributes zeros.
    """
    costs = [1.0] * len(cohort) if costs is None else list(costs)
    if len(costs) != len(cohort):
        raise ValueError("need one cost per sampled client")
    order = sorted(range(len(cohort)), key=lambda i: (-costs[i], cohort[i]))
    load = [0.0] * world_size
    ranks: List[List[int]] = [[] for _ in range(world_size)]
    for i in order:
        target = min(range(world_size), key=lambda r: (load[r], r))
        ranks[target].append(cohort[i])
        load[target] += costs[i]
    return [sorted(clients) for clients in ranks]


def dropped_clients(cohort: Sequence[int], probability: float, schedule: Sequence[Sequence[int]],
                    seed: int, global_round: int) -> List[int]:
    """The sampled clients that drop out of ``global_round`` (0-based), sorted.

    A client drops when ``schedule`` lists [global_round + 1, client] (rounds counted from 1, as
    in metrics.jsonl) or when its own draw, from a generator seeded by (seed, round, client),
    falls below ``probability``. Every rank computes the same answer, and a client's fate does
    not depend on which other clients were sampled.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"dropout probability {probability} is not in [0, 1]")
    scheduled = {int(client) for round_, client in schedule if int(round_) == global_round + 1}
    dropped = []
    for client in cohort:
        draw = np.random.default_rng([seed, global_round, client, 0xD809]).random() if probability > 0 else 1.0
        if client in scheduled or draw < probability:
            dropped.append(client)
    return sorted(dropped)
