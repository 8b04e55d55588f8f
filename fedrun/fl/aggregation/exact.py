"""Exact (order-independent) sums: the fixed-point grid every term is rounded to.

Float addition is not associative, so a plain fp32 sum depends on which clients share a rank, and
Adam turns those 1-ulp differences into visibly different models. In exact mode every term is
rounded to a fixed-point grid first and the round buffer holds float64 integers: integer sums
below 2**53 are exact in float64, in any order and grouping, so 1, 2, 3 or 4 processes produce
the same bits. The grid is shared by every rank without communicating: per block of
``EXACT_BLOCK`` coordinates it is 2**(e_b - F), where 2**e_b bounds the largest magnitude of a
*reference* vector every rank holds (the global weights for the update; at least 1/64 of the
reference's overall largest magnitude) and F leaves room for the round's total weight and
``EXACT_HEADROOM_BITS`` bits of headroom. So an update coordinate is represented to a grid step
of 2**-F times the bound of its block's largest weight (F = 36 for the default job: ~1.5e-11 of
it), not relative to the coordinate itself: in a block whose largest weight is 1, an update of
1e-12 is below one grid step. ``aggregation.rounding`` says what happens to it: 'stochastic' (the
default) rounds up with probability equal to the fraction of a step, from the (seed, round,
client) stream, so the rounded term is unbiased (to 2**-24 of a step) and the sum stays
independent of the world size; 'nearest' rounds it to zero, every round. A term whose block holds
a value at or beyond 2**6 = 64 times that block's bound (a diverging client) is out of range: the
client is rejected ('exact_range') instead of overflowing. Weights must be integers (sample counts
or 1). Cost: twice the bytes of the all-reduce and a few passes per client (docs/benchmarks).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


EXACT_BLOCK = 1024  # coordinates sharing one fixed-point grid in exact mode


EXACT_HEADROOM_BITS = 6  # exact mode: terms up to 2**6 x the block's reference bound fit


EXACT_FLOOR_BITS = 6  # a block's bound is at least 2**-6 x the reference's overall maximum


EXACT_RANGE = "exact_range"  # rejection reason of a term beyond the exact grid's range


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
