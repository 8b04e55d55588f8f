"""The seeded-generator recipe: every random stream of a run is derived from a tuple of keys.

(seed, client, round) for a client's batches and noise, (seed, round) for cohorts and server-side
noise, (seed, stream tag, step) for the centralized baseline, (seed, chunk) for sample chunks.
Deriving, not carrying, generator state is what makes results independent of the world size
(every rank derives the same stream without communicating) and resume exact (there is no hidden
state to save).
"""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (NumPy's SeedSequence: well mixed, order-sensitive)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def derived_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded by ``derived_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))
