"""Split the training set among the virtual clients (iid, Dirichlet label skew, shards, unbalanced).

Every method is a pure function of (labels, num_samples, num_clients, params, seed), registered
in ``fedrun.registry.PARTITIONERS`` under its ``partition.method`` name with its own parameters
(``partition.alpha``, ...): all ranks compute the same partition without communicating.
Randomness comes from ``np.random.default_rng([seed, k])`` with a different ``k`` per method,
never from global RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from fedrun.errors import DataError
from fedrun.registry import PARTITIONERS, require

# Bounded retries for the Dirichlet split before the deterministic fix-up of empty clients.
_DIRICHLET_TRIES = 100


def partition_indices(labels: Optional[np.ndarray], num_samples: int, num_clients: int,
                      cfg: Any, seed: int) -> List[np.ndarray]:
    """Client c's sample indices (sorted int64 arrays).

    Every index in ``range(num_samples)`` belongs to exactly one client, every client has at
    least one sample, and the result depends only on the arguments (deterministic from ``seed``).
    """
    _check_sizes(labels, num_samples, num_clients)
    method = PARTITIONERS.get(cfg.method)
    if getattr(method, "needs_labels", False) and labels is None:
        raise DataError(f"partition.method='{cfg.method}' needs labels, but the data set has none "
                        "(digits have them; for image folders set data.labels_csv/data.label_column)")
    parts = method(labels, num_samples, num_clients, PARTITIONERS.build_params(cfg.method, cfg), seed)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_summary(parts: Sequence[np.ndarray], labels: Optional[np.ndarray]) -> dict:
    """Client sizes and, with labels, per-client class counts (plain ints, JSON-ready).

    ``class_counts[c][k]`` is the number of samples of class ``k`` held by client ``c``; classes are
    the label values themselves when they are non-negative integers, else their sorted order.
    """
    sizes = [int(len(p)) for p in parts]
    if labels is None:
        return {"sizes": sizes, "class_counts": None}
    codes, num_classes = _class_codes(np.asarray(labels))
    counts = [np.bincount(codes[np.asarray(p, dtype=np.int64)], minlength=num_classes).tolist()
              for p in parts]
    return {"sizes": sizes, "class_counts": counts}


def _class_codes(labels: np.ndarray) -> tuple:
    """Labels as codes 0..k-1 (the values themselves if they are non-negative integers)."""
    if labels.size and np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0:
        return labels.astype(np.int64), int(labels.max()) + 1
    values, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), len(values)


def _check_sizes(labels: Optional[np.ndarray], num_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise DataError(f"cannot split {num_samples} training samples among num_clients={num_clients} "
                        "clients: every client needs at least one sample")
    if labels is not None and len(labels) != num_samples:
        raise DataError(f"got {len(labels)} labels for {num_samples} samples")


def _needs_labels(method: Callable) -> Callable:
    """Marks a method that splits by label: partition_indices refuses it for unlabelled data."""
    method.needs_labels = True
    return method


@PARTITIONERS.register("iid")
def _iid(labels, num_samples: int, num_clients: int, params: None, seed: int):
    perm = np.random.default_rng([seed, 1]).permutation(num_samples)
    return np.array_split(perm, num_clients)


@dataclass
class DirichletParams:
    alpha: float = 0.5
    """Dirichlet concentration: small = each client sees few classes, large = near iid."""

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


@PARTITIONERS.register("dirichlet", params=DirichletParams)
@_needs_labels
def _dirichlet(labels, num_samples: int, num_clients: int, params: DirichletParams, seed: int):
    """Per class, client shares ~ Dir(alpha); retried until no client is empty, then fixed up."""
    rng = np.random.default_rng([seed, 2])
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    parts: List[np.ndarray] = []
    for _ in range(_DIRICHLET_TRIES):
        parts = _dirichlet_once(by_class, num_clients, params.alpha, rng)
        if all(len(p) for p in parts):
            return parts
    # Tiny alpha with many clients rarely covers everyone; move single samples instead of failing.
    return _fill_empty(parts)


def _dirichlet_once(by_class: List[np.ndarray], num_clients: int, alpha: float,
                    rng: np.random.Generator) -> List[np.ndarray]:
    chunks: List[List[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
        idx = rng.permutation(idx)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:
            # Very small alpha can underflow every gamma draw: give the class to one client.
            shares = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            chunks[client].append(piece)
    return [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]


@dataclass
class ShardsParams:
    shards_per_client: int = 2
    """Label-sorted shards per client (about that many classes each)."""

    def __post_init__(self) -> None:
        require(self.shards_per_client >= 1, "shards_per_client",
                f"must be >= 1, got {self.shards_per_client}")


@PARTITIONERS.register("shards", params=ShardsParams)
@_needs_labels
def _shards(labels, num_samples: int, num_clients: int, params: ShardsParams, seed: int):
    """Label-sorted contiguous shards, ``shards_per_client`` dealt to each client at random."""
    rng = np.random.default_rng([seed, 3])
    perm = rng.permutation(num_samples)
    # Shuffle first so ties within a class are broken randomly, then a stable sort by label.
    order = perm[np.argsort(np.asarray(labels)[perm], kind="stable")]
    per_client = params.shards_per_client
    shards = np.array_split(order, num_clients * per_client)
    deal = rng.permutation(len(shards))
    parts = [np.concatenate([shards[s] for s in deal[c * per_client:(c + 1) * per_client]])
             for c in range(num_clients)]
    # More shards than samples leaves some shards (possibly a whole client's) empty.
    return _fill_empty(parts)


@dataclass
class UnbalancedParams:
    unbalanced_sigma: float = 1.0
    """Client sizes are log-normal with this sigma (0 = equal sizes)."""

    def __post_init__(self) -> None:
        require(self.unbalanced_sigma >= 0, "unbalanced_sigma",
                f"must be >= 0, got {self.unbalanced_sigma}")


@PARTITIONERS.register("unbalanced", params=UnbalancedParams)
def _unbalanced(labels, num_samples: int, num_clients: int, params: UnbalancedParams, seed: int):
    """iid content, client sizes proportional to log-normal draws (each client >= 1)."""
    rng = np.random.default_rng([seed, 4])
    weights = rng.lognormal(0.0, params.unbalanced_sigma, num_clients)
    sizes = _round_sizes(weights, num_samples)
    perm = rng.permutation(num_samples)
    return np.split(perm, np.cumsum(sizes)[:-1])


def _round_sizes(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes >= 1 summing to ``total``, proportional to ``weights`` (largest remainder)."""
    spare = total - len(weights)
    exact = weights / weights.sum() * spare
    sizes = np.floor(exact).astype(np.int64)
    leftover = spare - int(sizes.sum())
    # Stable sort so that equal weights (sigma=0) hand out the leftover by client order.
    sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    return sizes + 1


def _fill_empty(parts: List[np.ndarray]) -> List[np.ndarray]:
    """Move single samples from the largest clients to empty ones (deterministic)."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for client in range(len(parts)):
        if len(parts[client]):
            continue
        donor = int(np.argmax([len(p) for p in parts]))
        # The caller guarantees num_samples >= num_clients, so the largest client has >= 2.
        parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts
